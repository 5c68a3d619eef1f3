"""`openmoshi infer` end to end on tiny models: ours from `openmoshi init`, and one written by Kyutai's code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import read_speech
from openmoshi.bundle import init_model, load_model
from openmoshi.cli.main import main
from openmoshi.generation.generator import Generator


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, speech_files) -> list[Path]:
    """Two recordings of different lengths, one of them 44.1 kHz stereo."""
    folder = tmp_path_factory.mktemp("inputs")
    first = folder / "first.wav"
    sf.write(first, read_speech(speech_files[0], 1.5)[0].numpy(), 24_000)
    second = folder / "second.flac"
    mono = read_speech(speech_files[1], 1.0)[0].numpy()
    from openmoshi.audio.io import resample
    up = resample(torch.from_numpy(mono)[None], 24_000, 44_100)[0].numpy()
    sf.write(second, np.stack([up, 0.5 * up], axis=1), 44_100)
    return [first, second]


def _check_outputs(out: Path, inputs: list[Path], model: Path) -> None:
    bundle = load_model(model)
    for path in inputs:
        info = sf.info(path)
        moshi = sf.info(out / f"{path.stem}.moshi.wav")
        stereo = sf.info(out / f"{path.stem}.stereo.wav")
        assert moshi.samplerate == 24_000 and moshi.channels == 1
        assert stereo.channels == 2
        assert abs(moshi.duration - info.duration) < 1e-3
        assert abs(stereo.duration - info.duration) < 1e-3
        transcript = json.loads((out / f"{path.stem}.transcript.json").read_text())
        assert len(transcript["tokens"]) == int(np.ceil(info.duration * 12.5))
        tok = bundle.tokenizer  # tokens outside its vocabulary (the LM's may be larger) are not words
        spoken = [t for t in transcript["tokens"]
                  if t not in (0, 3) and t < tok.get_piece_size() and not tok.is_control(t)]
        assert [t for w in transcript["words"] for t in w["tokens"]] == spoken
        for word in transcript["words"]:
            assert bundle.tokenizer.decode(word["tokens"]).strip() == word["word"]
            assert 0 <= word["start"] < word["end"] <= info.duration + 0.08
        assert transcript["text"] == bundle.tokenizer.decode(spoken)


def test_infer_on_init_folder(tiny_model, inputs, tmp_path, capsys):
    out = tmp_path / "answers"
    assert main(["infer", "--model", str(tiny_model), *map(str, inputs), "--out", str(out), "--seed", "0",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resampled 44100 Hz -> 24000 Hz" in printed and "mixed 2 channels down to mono" in printed
    _check_outputs(out, inputs, tiny_model)


def test_greedy_infer_equals_generator_loop_and_batch_equals_single(tiny_model, inputs, tmp_path):
    from openmoshi.audio.io import load_audio
    from openmoshi.generation.offline import answer_recordings

    bundle = load_model(tiny_model)
    greedy = dict(bundle.generation, temp=0.0, temp_text=0.0)
    wavs = [load_audio(p).wav for p in inputs]
    together = answer_recordings(bundle, wavs, greedy)
    for wav, answer in zip(wavs, together):
        alone = answer_recordings(bundle, [wav], greedy)[0]
        assert torch.equal(alone.codes, answer.codes)
        assert torch.allclose(alone.audio, answer.audio, atol=1e-5)
        # A direct Generator loop over Mimi codes gives the same tokens.
        gen = Generator(bundle.lm, **greedy)
        frames = []
        with torch.inference_mode(), bundle.mimi.streaming(1), gen.streaming(1):
            padded = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % 1920 + 1920 * gen.max_delay))[None]
            for start in range(0, padded.shape[-1], 1920):
                out = gen.step(bundle.mimi.encode(padded[..., start:start + 1920])[:, : gen.n_user])
                if out is not None:
                    frames.append(out[0, :, 0])
        direct = torch.stack(frames, dim=-1)[:, : answer.codes.shape[-1]]
        assert torch.equal(direct, answer.codes)
    # The CLI writes the same greedy transcript.
    out = tmp_path / "greedy"
    assert main(["infer", "--model", str(tiny_model), str(inputs[0]), "--out", str(out), "--greedy", "--quiet"]) == 0
    written = json.loads((out / f"{inputs[0].stem}.transcript.json").read_text())
    assert written["tokens"] == together[0].codes[0].tolist()


def test_broken_file_among_good_ones(tiny_model, inputs, tmp_path, capsys):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 24_000)
    out = tmp_path / "answers"
    code = main(["infer", "--model", str(tiny_model), str(broken), str(inputs[0]), str(empty), "--out", str(out),
                 "--quiet"])
    printed = capsys.readouterr()
    assert code == 1
    assert "broken.wav" in printed.err and "empty.wav" in printed.err  # errors go to stderr
    assert "Traceback" not in printed.out + printed.err
    assert (out / f"{inputs[0].stem}.moshi.wav").exists()
    assert not (out / "broken.moshi.wav").exists()


def test_missing_model_file_is_a_clear_error(tiny_model, inputs, tmp_path, capsys):
    import shutil
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    (partial / "tokenizer_tiny.model").unlink()
    assert main(["infer", "--model", str(partial), str(inputs[0]), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer_tiny.model" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory, tiny_model) -> Path:
    """A model folder written with Kyutai's own classes: random weights, config.json, a fresh SentencePiece."""
    loaders = pytest.importorskip("moshi.models.loaders")
    import sentencepiece as spm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("kyutai")
    corpus = folder / "corpus.txt"
    words = ["hello", "there", "how", "are", "you", "doing", "today", "weather", "sunny", "talk", "about",
             "the", "morning", "evening", "music", "friends", "thank", "fine", "good", "great"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(400)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=40, hard_vocab_limit=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(tokenizer_name="spm.model", text_card=128)
    lm_kwargs = {k: v for k, v in config.items() if k not in (
        "model_type", "moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora", "lora_rank",
        "lora_scaling", "lm_gen_config")}
    torch.manual_seed(5)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(folder / "model.safetensors"))
    mimi_cfg = json.loads((tiny_model / "mimi_config.json").read_text())
    mimi = loaders.get_mimi(None, mimi_config=mimi_cfg)
    state = mimi.state_dict()
    gen = torch.Generator().manual_seed(0)
    for key in state:
        if key.endswith("embedding_sum"):
            state[key] = torch.randn(state[key].shape, generator=gen) * 0.1
        elif key.endswith("_initialized"):
            state[key] = torch.ones_like(state[key])
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / config["mimi_name"]))
    (folder / "mimi_config.json").write_text(json.dumps(mimi_cfg))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_infer_on_folder_written_by_reference(reference_folder, inputs, tmp_path):
    out = tmp_path / "answers"
    assert main(["infer", "--model", str(reference_folder), *map(str, inputs), "--out", str(out),
                 "--batch-size", "2", "--seed", "1", "--quiet"]) == 0
    _check_outputs(out, inputs, reference_folder)


def test_infer_streams_long_files_in_blocks_with_the_same_answers(tiny_model, inputs, tmp_path):
    """Streaming (blocks resampled with context, frames fed as read) gives the whole-file answers."""
    from openmoshi.audio.io import load_audio
    from openmoshi.audio.stream import open_audio
    from openmoshi.generation.offline import answer_recordings, stream_answers

    bundle = load_model(tiny_model)
    greedy = dict(bundle.generation, temp=0.0, temp_text=0.0)
    streams = [open_audio(p) for p in inputs]
    for stream, path in zip(streams, inputs):
        whole = load_audio(path).wav
        blocks = torch.cat(list(stream.blocks(block_seconds=0.3)), dim=-1)  # many small blocks
        assert blocks.shape == whole.shape and torch.allclose(blocks, whole, atol=1e-6)
    wavs = [load_audio(p).wav for p in inputs]
    reference = answer_recordings(bundle, wavs, greedy)
    rows: list[list] = [[], []]
    for answer in stream_answers(bundle, [s.blocks(block_seconds=0.25) for s in streams], greedy):
        rows[answer.row].append(answer)
    for row, ref, wav in zip(rows, reference, wavs):
        assert [a.index for a in row] == list(range(len(row)))
        assert [a.token for a in row] == ref.codes[0].tolist()
        assert torch.allclose(torch.cat([a.moshi for a in row], dim=-1), ref.audio, atol=1e-5)
        assert torch.allclose(torch.cat([a.user for a in row], dim=-1), wav, atol=1e-6)


def test_infer_refuses_to_overwrite_or_merge_outputs(tiny_model, inputs, tmp_path, capsys):
    out = tmp_path / "answers"
    args = ["infer", "--model", str(tiny_model), str(inputs[0]), "--out", str(out), "--greedy", "--quiet"]
    assert main(args) == 0
    before = (out / "first.moshi.wav").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert (out / "first.moshi.wav").stat().st_mtime_ns == before
    assert main([*args, "--overwrite"]) == 0
    assert not list(out.glob("*.partial"))
    # Two inputs of one name in different folders: refused before anything loads (the model does not exist).
    other = tmp_path / "elsewhere" / "first.wav"
    other.parent.mkdir()
    other.write_bytes(inputs[0].read_bytes())
    capsys.readouterr()
    assert main(["infer", "--model", str(tmp_path / "none"), str(inputs[0]), str(other), "--out",
                 str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert "would both write" in err and "Traceback" not in err


def test_infer_out_that_is_a_file_fails_before_loading(inputs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["infer", "--model", str(tmp_path / "no-model"), str(inputs[0]), "--out", str(taken)]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err  # not the missing model: --out was checked first
