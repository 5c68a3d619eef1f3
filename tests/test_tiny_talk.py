"""tiny-talk: its domain, the data steps the recipe adds (mono split, codec-only folders), the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from openmoshi.bundle import SHIPPED, init_model, load_codec, load_model, package_model
from openmoshi.codec import Mimi, mimi_tiny
from openmoshi.data.format import DataFormatError, Word, read_alignments, write_alignments, write_manifest
from openmoshi.data.mono import split_dialogues
from openmoshi.data.synth import talk
from openmoshi.train.codec.model import export_mimi


def test_every_fact_is_taught_and_only_phrasings_are_held_out():
    for kind, phrasings in talk.PHRASINGS.items():
        assert phrasings["train"] and phrasings["test"]
        assert not set(phrasings["train"]) & set(phrasings["test"]), kind
    rng = np.random.default_rng(0)
    train_questions = {talk.random_question(rng, "train").text for _ in range(3000)}
    held_out = talk.eval_questions(40, seed=1)
    assert {q.kind for q in held_out} == set(talk.PHRASINGS)
    for q in held_out:
        assert q.text not in train_questions
        # the same fact is asked in training in other words, and Moshi's reply ends on the answer
        assert q.reply.rstrip(".").lower().split()[-1] == q.answer
        assert any(q.reply == t.reply for t in (talk.make_question(q.kind, f, p) for k, f in talk.all_facts()
                                                if k == q.kind for p in talk.PHRASINGS[k]["train"]))
    assert talk.make_question("plus", {"a": "seven", "b": "five", "x": "twelve"}, "What is {a} plus {b}?").reply \
        == "Seven plus five is twelve."


def test_scripts_pin_held_out_phrasings_to_the_test_split(tmp_path):
    path = talk.write_dialogue_scripts(tmp_path / "s.jsonl", 50, seed=3, test_fraction=0.2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["split"] for d in lines].count("test") == 10
    small_talk = {t for pair in talk.GREETINGS + talk.GOODBYES for t in pair}
    for d in lines:
        questions = [t["text"] for t in d["turns"] if t["speaker"] == "user" and t["text"] not in small_talk]
        assert 1 <= len(questions) <= 3
        # every held-out phrasing starts "Tell me", no training one does
        assert all(q.startswith("Tell me") == (d["split"] == "test") for q in questions), d
    corpus = set(talk.text_corpus())
    assert all(t["text"] in corpus for d in lines for t in d["turns"])  # the tokenizer sees every sentence


def _stereo_dialogue(folder, name="d0"):
    rate = 24_000
    left = 0.1 * np.sin(np.arange(rate) / 7).astype(np.float32)
    right = 0.2 * np.sin(np.arange(rate) / 3).astype(np.float32)
    sf.write(folder / f"{name}.wav", np.stack([left, right], 1), rate, subtype="FLOAT")
    write_alignments(folder / f"{name}.json", [Word("hi", 0.1, 0.3, "SPEAKER_MAIN"),
                                               Word("hello?", 0.5, 0.8, "SPEAKER_USER")])
    write_manifest(folder / "set.jsonl", [(f"{name}.wav", 1.0)])
    return left, right


def test_split_dialogues_gives_each_channel_its_own_words(tmp_path):
    left, right = _stereo_dialogue(tmp_path)
    manifest = split_dialogues(tmp_path / "set.jsonl", tmp_path / "mono")
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [e["path"] for e in entries] == ["d0.ch0.wav", "d0.ch1.wav"]
    for channel, (ref, word) in enumerate([(left, "hi"), (right, "hello?")]):
        audio, rate = sf.read(tmp_path / "mono" / f"d0.ch{channel}.wav", dtype="float32")
        assert rate == 24_000 and audio.ndim == 1
        assert np.abs(audio - ref).max() < 1e-4  # 16-bit PCM
        assert [w.text for w in read_alignments(tmp_path / "mono" / f"d0.ch{channel}.json")] == [word]
    sf.write(tmp_path / "d0.wav", left, 24_000)  # a mono "dialogue": a clear error
    with pytest.raises(DataFormatError, match="stereo"):
        split_dialogues(tmp_path / "set.jsonl", tmp_path / "mono2")


def test_a_codec_only_folder_loads_with_all_or_some_codebooks(tmp_path):
    torch.manual_seed(0)
    mimi = Mimi(mimi_tiny())
    export_mimi(mimi, tmp_path, mimi.cfg)  # what `openmoshi train codec` writes as RUN/model
    assert load_codec(tmp_path).num_codebooks == mimi.cfg.quantizer.n_q
    four = load_codec(tmp_path, num_codebooks=4)
    assert four.num_codebooks == 4
    wav = torch.randn(1, 1, 1920 * 3) * 0.1
    with torch.no_grad():
        assert torch.equal(four.encode(wav), load_codec(tmp_path).encode(wav)[:, :4])


@pytest.mark.skipif(not (SHIPPED["tiny-talk"] / "config.json").is_file(), reason="tiny-talk is not shipped")
def test_shipped_tiny_talk_loads_and_fits_the_size_budget(tmp_path):
    folder = init_model("tiny-talk", tmp_path / "tt")
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 25e6
    bundle = load_model(folder)
    assert bundle.config.dep_q == 4 and bundle.mimi.num_codebooks == 4
    assert bundle.tokenizer.get_piece_size() <= bundle.config.text_card


def test_package_model_stores_the_lm_in_bfloat16(tmp_path):
    source = init_model("tiny", tmp_path / "src", seed=1)
    packed = package_model(source, tmp_path / "packed")
    from safetensors import safe_open
    with safe_open(packed / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    a, b = load_model(source), load_model(packed)
    for (name, p), q in zip(a.lm.state_dict().items(), b.lm.state_dict().values()):
        assert torch.equal(p.to(torch.bfloat16).float(), q.float()), name


def test_init_tiny_talk_says_how_to_build_it_when_not_shipped(tmp_path, monkeypatch):
    from openmoshi import bundle
    from openmoshi.errors import CheckpointError
    monkeypatch.setitem(bundle.SHIPPED, "tiny-talk", tmp_path / "absent")
    with pytest.raises(CheckpointError, match="recipes/tiny_talk.py"):
        init_model("tiny-talk", tmp_path / "out")
