"""`data align --aligner faster-whisper` on a random-weight Whisper built and converted to CTranslate2 here.

Its tokenizer.json is Whisper's real multilingual vocabulary, rebuilt from the tiktoken file that ships inside
openai-whisper (nothing is downloaded). The words are nonsense; the plumbing, timings and files are real.
"""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import soundfile as sf
from conftest import read_speech

from openmoshi.cli.main import main
from openmoshi.data.align import AlignError, make_aligner

pytest.importorskip("faster_whisper")
ctranslate2 = pytest.importorskip("ctranslate2")
pytest.importorskip("transformers")
whisper_tokenizer = pytest.importorskip("whisper.tokenizer")


def _byte_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell tokens."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def whisper_tokenizer_json():
    """A `tokenizers` byte-level BPE equal to openai-whisper's multilingual tiktoken encoding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tik = whisper_tokenizer.get_tokenizer(multilingual=True, num_languages=99)
    ranks = tik.encoding._mergeable_ranks
    byte = _byte_unicode()

    def spell(token: bytes) -> str:
        return "".join(byte[b] for b in token)

    def last_merge(token: bytes, rank: int) -> tuple[bytes, bytes]:
        # tiktoken's BPE on the token's bytes with the merges ranked below it ends in the two parts it joins
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            _, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts[0], parts[1]

    merges = sorted((rank, last_merge(token, rank)) for token, rank in ranks.items() if len(token) > 1)
    tok = Tokenizer(models.BPE({spell(t): r for t, r in ranks.items()},
                               [(spell(a), spell(b)) for _, (a, b) in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted(tik.special_tokens, key=tik.special_tokens.get)  # <|endoftext|> .. timestamps, in id order
    tok.add_special_tokens([AddedToken(name, special=True) for name in specials])
    text = " Hello world, it's 2024!"
    assert tok.encode(text).ids == tik.encode(text) and tok.get_vocab_size() == 51865
    return tok, tik.special_tokens


@pytest.fixture(scope="module")
def tiny_ct2_whisper(tmp_path_factory):
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    tok, ids = whisper_tokenizer_json()
    root = tmp_path_factory.mktemp("fw")
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    hf_tok = WhisperTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=[n for n in ids if n != "<|endoftext|>"])
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=448,
                           decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model = WhisperForConditionalGeneration(config)
    languages = {f"<|{code}|>": ids[f"<|{code}|>"] for code in whisper_tokenizer.LANGUAGES if f"<|{code}|>" in ids}
    model.generation_config = GenerationConfig(decoder_start_token_id=sot, suppress_tokens=[],
                                               begin_suppress_tokens=[220, eot], alignment_heads=[[0, 0], [0, 1]],
                                               lang_to_id=languages)
    model.save_pretrained(root / "hf")
    hf_tok.save_pretrained(root / "hf")
    out = root / "ct2"
    ctranslate2.converters.TransformersConverter(str(root / "hf"), copy_files=["tokenizer.json"]).convert(str(out))
    return out


def _write_recordings(data, speech_files):
    (data / "sub").mkdir(parents=True)
    a, b = read_speech(speech_files[0], 2.0)[0].numpy(), read_speech(speech_files[1], 2.0)[0].numpy()
    sf.write(data / "stereo.wav", np.stack([a, b], axis=1), 24_000)
    sf.write(data / "sub" / "mono.flac", a, 24_000)
    sf.write(data / "quiet.wav", np.stack([a, np.zeros_like(a)], axis=1), 24_000)  # a silent user channel
    (data / "broken.wav").write_bytes(b"RIFF not really a wav")


@pytest.mark.slow
def test_align_folder_faster_whisper(tiny_ct2_whisper, speech_files, tmp_path, capsys):
    data = tmp_path / "rec"
    _write_recordings(data, speech_files)
    cmd = ["data", "align", str(data), "--aligner", "faster-whisper", "--model", str(tiny_ct2_whisper),
           "--beam-size", "1", "--temperatures", "0"]
    assert main(cmd) == 0, [p.read_text() for p in data.rglob("*.err")]
    assert "aligned 3, skipped 0 (already done), failed 1" in capsys.readouterr().out
    files = {"stereo": {"SPEAKER_MAIN", "SPEAKER_USER"}, "sub/mono": {"SPEAKER_MAIN"}, "quiet": {"SPEAKER_MAIN"}}
    for name, speakers in files.items():
        obj = json.loads((data / f"{name}.json").read_text())
        assert set(obj) == {"alignments", "meta"}
        assert obj["meta"] == {"aligner": "faster-whisper", "duration": pytest.approx(2.0)}
        words = obj["alignments"]
        assert words, name  # random weights still emit tokens; each channel with sound gets words
        assert {w[2] for w in words} == speakers
        for text, (start, end), speaker in words:
            assert isinstance(text, str) and text == text.strip() and text
            assert 0.0 <= start <= end <= 2.0
        assert [w[1][0] for w in words] == sorted(w[1][0] for w in words)  # ordered by start
        for speaker in speakers:  # one speaker's words do not overlap each other
            mine = [w[1] for w in words if w[2] == speaker]
            assert all(e0 <= s1 + 1e-6 for (_, e0), (s1, _) in pairwise(mine))
    assert "broken.wav" in (data / "broken.json.err").read_text()
    manifest = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    assert sorted(m["path"] for m in manifest) == ["quiet.wav", "stereo.wav", "sub/mono.flac"]
    # a rerun skips what is done and retries the failure; no temporary file is left behind
    before = (data / "stereo.json").stat().st_mtime_ns
    assert main(cmd) == 0
    assert "aligned 0, skipped 3 (already done), failed 1" in capsys.readouterr().out
    assert (data / "stereo.json").stat().st_mtime_ns == before
    assert not [p for p in data.rglob("*") if ".tmp" in p.name]


def test_faster_whisper_missing_weights_say_what_to_do(tiny_ct2_whisper, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(AlignError, match="not on this machine.*Systran/faster-whisper-medium.*--model /path"):
        make_aligner("faster-whisper", model="medium")
    with pytest.raises(AlignError, match="not on this machine.*someone/ct2-whisper"):
        make_aligner("faster-whisper", model="someone/ct2-whisper")
    with pytest.raises(AlignError, match="unknown faster-whisper model 'mediumm'"):
        make_aligner("faster-whisper", model="mediumm")
    with pytest.raises(AlignError, match="no such folder"):
        make_aligner("faster-whisper", model=str(tmp_path / "nowhere"))
    (tmp_path / "model.pt").write_bytes(b"an openai-whisper checkpoint")
    with pytest.raises(AlignError, match="needs a CTranslate2 model folder"):
        make_aligner("faster-whisper", model=str(tmp_path / "model.pt"))
    # a folder without tokenizer.json: named at once, not a network retry loop
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("model.bin", "config.json", "vocabulary.json"):
        (partial / name).write_bytes((tiny_ct2_whisper / name).read_bytes())
    with pytest.raises(AlignError, match="missing tokenizer.json"):
        make_aligner("faster-whisper", model=str(partial))
    with pytest.raises(AlignError, match="language 'xx' is not one of this model's: af, am"):
        make_aligner("faster-whisper", model=str(tiny_ct2_whisper), language="xx")
