"""The alignment teacher: per-frame targets from word timings (by hand), espeak-ng phonemes, and a codec run
distilling its semantic level from espeak-ng speech with exact word timings, then `eval codec --teacher`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from openmoshi.cli.main import main
from openmoshi.data.format import SPEAKER_USER, Word, write_alignments
from openmoshi.errors import ConfigError
from openmoshi.train.codec.alignment_teacher import SILENCE, AlignmentTeacher, espeak_phonemes, unit_embedding

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def test_targets_weight_each_unit_by_its_time_in_the_frame():
    t = AlignmentTeacher("letters", dim=16)
    e = {s: unit_embedding(s, 16) for s in ("a", "b", "c", SILENCE)}
    words = [Word("Ab,", 0.0, 0.16, SPEAKER_USER), Word("c", 0.20, 0.28, SPEAKER_USER)]
    spans = t.unit_spans(words)
    assert spans == [("a", 0.0, 0.08), ("b", 0.08, 0.16), ("c", 0.20, 0.28)]  # punctuation and case dropped
    out = t.targets(spans, 5, 0.08)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out[0], 0.08 * e["a"])
    torch.testing.assert_close(out[1], 0.08 * e["b"])
    torch.testing.assert_close(out[2], 0.04 * e[SILENCE] + 0.04 * e["c"])  # "c" starts half-way into frame 2
    torch.testing.assert_close(out[3], 0.04 * e["c"] + 0.04 * e[SILENCE])
    torch.testing.assert_close(out[4], 0.08 * e[SILENCE])
    # A word past the end of the audio adds nothing beyond the last frame.
    assert torch.isfinite(t.targets(t.unit_spans([Word("abc", 0.3, 9.0, SPEAKER_USER)]), 5, 0.08)).all()


def test_unit_embeddings_are_fixed_and_nearly_orthogonal():
    a = unit_embedding("k", 256)
    code = "from openmoshi.train.codec.alignment_teacher import unit_embedding as u; print(u('k', 256)[:4].tolist())"
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert other == a[:4].tolist()  # the same vector in another process
    symbols = ["k", "a", "p", "I", "t", "@", SILENCE]
    cos = torch.stack([unit_embedding(s, 256) for s in symbols])
    off = (cos @ cos.T - torch.eye(len(symbols))).abs().max()
    assert float(a.norm()) == pytest.approx(1.0) and off < 0.3


def test_phone_purity_by_hand():
    from openmoshi.eval.phone_purity import dominant_units, phone_purity
    t = AlignmentTeacher("letters")
    # "ab" over 0.00-0.16 s, "c" over 0.20-0.26 s: frame 2 has "c" for 0.04 s (half: kept), frame 3 for 0.02 s
    words = [Word("ab", 0.0, 0.16, SPEAKER_USER), Word("c", 0.20, 0.26, SPEAKER_USER)]
    assert dominant_units(t, words, 5, 0.08) == ["a", "b", "c", None, None]
    fit = [(1, "a"), (1, "a"), (1, "b"), (2, "b"), (3, "c")]
    out = phone_purity(fit, [(1, "a"), (2, "b"), (2, "a"), (9, "a")])
    assert out["phone_purity"] == pytest.approx(2 / 4)  # code 9 never seen: wrong
    assert out["phone_purity_majority"] == pytest.approx(3 / 4)  # "a" is the fit's most frequent unit
    assert out["phone_purity_unseen"] == pytest.approx(1 / 4) and out["phone_purity_codes"] == 3
    assert phone_purity([], [(1, "a")]) == {}


@needs_espeak
def test_espeak_phonemes_of_a_word():
    assert espeak_phonemes("cat") == ("k", "a", "t")
    assert len(espeak_phonemes("capital")) >= 5
    assert AlignmentTeacher("phonemes").word_units("Cat?") == ("k", "a", "t")


def test_unknown_units_are_a_clear_error():
    with pytest.raises(ConfigError, match="phonemes"):
        AlignmentTeacher("syllables")


def test_purity_fit_without_phone_purity_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "codec", "--checkpoint", str(tmp_path), str(tmp_path), "--purity-fit", str(tmp_path)]) != 0
    assert "--phone-purity" in capsys.readouterr().err


def test_file_features_count_frames_as_mimi_does(tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16_000 + 7, dtype=np.float32), 16_000)  # 1 s at 16 kHz + a partial frame
    write_alignments(wav.with_suffix(".json"), [Word("ab", 0.1, 0.5, SPEAKER_USER)])
    feats = AlignmentTeacher("letters", dim=8).file_features(wav, 1920, 24_000)
    assert feats.shape == (13, 8)  # ceil((24000 + 11) / 1920)
    (tmp_path / "b.wav").write_bytes(wav.read_bytes())
    with pytest.raises(Exception, match="alignment file not found"):
        AlignmentTeacher("letters").file_features(tmp_path / "b.wav", 1920, 24_000)


@needs_espeak
@pytest.mark.slow  # synthesis, 6 training steps, an evaluation
def test_codec_run_distils_phonemes_from_espeak_speech_and_evaluates(tmp_path, capsys):
    from openmoshi.data.synth.engines import Voice, espeak_synthesize
    data = tmp_path / "data"
    data.mkdir()
    lines = ["what is the capital of france", "seven plus five is twelve", "the cow says moo"]
    speeches = espeak_synthesize([(line.split(), Voice("espeak", v)) for line, v in
                                  zip(lines, ["en-us", "en-gb-x-rp+f2", "en-us+m3"])])
    for i, speech in enumerate(speeches):
        sf.write(data / f"s{i}.wav", speech.audio, 24_000)
        write_alignments(data / f"s{i}.json", [Word(w, a, b, SPEAKER_USER) for w, a, b in speech.words])
    run = tmp_path / "run"
    assert main(["train", "codec", "--data", str(data), "--out", str(run), "--max-steps", "6", "--batch-size", "2",
                 "--teacher", "phonemes", "--eval-every", "6", "--losses", "encodec", "--set", "losses.adv_start=100",
                 "--segment-seconds", "0.48", "--threads", "1", "--set", "train.progress=false",
                 "--set", "train.tensorboard=false", "--set", "data.eval_items=2", "--set", "data.eval_seconds=1"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    distill = [r["distill"] for r in rows if r["split"] == "train" and "distill" in r]
    assert distill and all(0.0 < d < 2.0 for d in distill)
    assert "teacher_cosine" in [r for r in rows if r["split"] == "eval"][-1]
    assert len(list((run / "teacher_cache").glob("*.pt"))) == 3
    capsys.readouterr()
    assert main(["eval", "codec", "--checkpoint", str(run / "model"), str(data), "--teacher", "phonemes", "--json",
                 "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["files"] == 3 and -1.0 <= metrics["teacher_cosine"] <= 1.0
    # phone purity of codebook 0: a map fitted on two voices, scored on the third
    fit = tmp_path / "fit"
    fit.mkdir()
    for i in (0, 1):
        for ext in ("wav", "json"):
            shutil.copy(data / f"s{i}.{ext}", fit / f"s{i}.{ext}")
    assert main(["eval", "codec", "--checkpoint", str(run / "model"), str(data / "s2.wav"), "--phone-purity",
                 "phonemes", "--purity-fit", str(fit), "--json", "--quiet", "--device", "cpu"]) == 0
    purity = json.loads(capsys.readouterr().out)
    assert 0.0 <= purity["phone_purity"] <= 1.0 and purity["phone_purity_frames"] >= 5
