"""`data align` plumbing on a random-weight Whisper built here (its words are nonsense, the plumbing is real)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import read_speech

from openmoshi.cli.main import main
from openmoshi.data.align import AlignError, make_aligner

whisper = pytest.importorskip("whisper")
pytest.importorskip("whisper_timestamped")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=24, n_text_state=32, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    # Whisper makes the text decoder's positional embedding with torch.empty (real checkpoints overwrite it):
    # left as is it holds whatever memory held before, NaN at times, and the decode fails depending on the
    # tests that ran earlier.
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0.0, 0.02)
    path = tmp_path_factory.mktemp("whisper") / "tiny-random.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_align_folder(tiny_whisper, speech_files, tmp_path, capsys):
    data = tmp_path / "rec"
    (data / "sub").mkdir(parents=True)
    a, b = read_speech(speech_files[0], 2.0)[0].numpy(), read_speech(speech_files[1], 2.0)[0].numpy()
    sf.write(data / "stereo.wav", np.stack([a, b], axis=1), 24_000)
    sf.write(data / "sub" / "mono.flac", a, 24_000)
    (data / "broken.wav").write_bytes(b"RIFF not really a wav")
    cmd = ["data", "align", str(data), "--model", str(tiny_whisper), "--beam-size", "1", "--temperatures", "0"]
    code = main(cmd)
    assert code == 0, [p.read_text() for p in data.rglob("*.err")]
    assert "aligned 2, skipped 0 (already done), failed 1" in capsys.readouterr().out
    stereo = json.loads((data / "stereo.json").read_text())
    mono = json.loads((data / "sub" / "mono.json").read_text())
    for obj, speakers in ((stereo, {"SPEAKER_MAIN", "SPEAKER_USER"}), (mono, {"SPEAKER_MAIN"})):
        # random weights put nonsense words anywhere in Whisper's 30 s window: only those inside the audio stay
        assert obj["meta"]["aligner"] == "whisper-timestamped"
        assert obj["meta"]["duration"] == pytest.approx(2.0)
        assert {w[2] for w in obj["alignments"]} <= speakers
        for text, (start, end), _ in obj["alignments"]:
            assert isinstance(text, str) and text and 0 <= start <= end <= 2.0
    err = (data / "broken.json.err").read_text()
    assert "broken.wav" in err
    manifest = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    assert sorted(m["path"] for m in manifest) == ["stereo.wav", "sub/mono.flac"]
    assert all(m["duration"] == pytest.approx(2.0) for m in manifest)
    # a rerun skips what is done and retries the failure
    before = (data / "stereo.json").stat().st_mtime_ns
    assert main(cmd) == 0
    assert "aligned 0, skipped 2 (already done), failed 1" in capsys.readouterr().out
    assert (data / "stereo.json").stat().st_mtime_ns == before
    assert not list(data.rglob(".*.tmp*"))


def test_offline_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(AlignError, match="not on this machine.*--model /path/to/model.pt"):
        make_aligner("whisper-timestamped", model="medium")
    with pytest.raises(AlignError, match="unknown Whisper model"):
        make_aligner("whisper-timestamped", model="mediumm")
    with pytest.raises(AlignError, match="unknown aligner"):
        make_aligner("nope")
