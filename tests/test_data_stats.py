"""`data stats` on hand-made alignments: every figure checked against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from openmoshi.cli.main import main
from openmoshi.data.format import Word
from openmoshi.data.stats import pad_fraction, turn_taking

M, U = "SPEAKER_MAIN", "SPEAKER_USER"
WORDS = [("a1", 0.0, 0.5, M), ("a2", 0.6, 1.0, M),   # one IPU: the 0.1 s hole is shorter than 0.2 s
         ("a3", 1.5, 2.0, M),                         # pause 0.5 (MAIN)
         ("u1", 2.3, 3.0, U), ("u2", 3.0, 3.4, U),    # gap 0.3 (USER starts)
         ("a4", 3.2, 4.0, M),                         # overlap 0.2 (MAIN started while USER spoke)
         ("u3", 4.5, 5.0, U),                         # gap 0.5 (USER)
         ("a5", 5.5, 7.0, M),                         # gap 0.5 (MAIN)
         ("mhm", 6.0, 6.3, U)]                        # backchannel: overlap 0.3 (USER)


def _words():
    return [Word(*w) for w in WORDS]


def test_turn_taking_by_hand():
    ev = turn_taking(_words())
    assert ev.values("ipu", M) == pytest.approx([1.0, 0.5, 0.8, 1.5])
    assert ev.values("ipu", U) == pytest.approx([1.1, 0.5, 0.3])
    assert ev.values("pause", M) == pytest.approx([0.5]) and ev.values("pause", U) == []
    assert ev.values("gap", U) == pytest.approx([0.3, 0.5]) and ev.values("gap", M) == pytest.approx([0.5])
    assert ev.values("overlap", M) == pytest.approx([0.2]) and ev.values("overlap", U) == pytest.approx([0.3])


def test_pad_fraction_by_hand():
    # MAIN covers frames 0-6, 7-12, 18-24, 40-49, 68-87 of 100: 50 frames
    assert pad_fraction(_words(), 8.0) == pytest.approx(0.5)


def test_stats_command_json_and_plots(tmp_path, capsys):
    data = tmp_path / "set"
    (data / "a").mkdir(parents=True)
    for name in ("one", "two"):
        sf.write(data / "a" / f"{name}.wav", np.zeros((8 * 24_000, 2), dtype=np.float32), 24_000)
        (data / "a" / f"{name}.json").write_text(json.dumps(
            {"alignments": [[t, [s, e], spk] for t, s, e, spk in WORDS],
             "meta": {"voices": {"moshi": "m", "user": f"u-{name}"}, "split": "train"}}))
    (data / "train.jsonl").write_text("\n".join(json.dumps({"path": f"a/{n}.wav", "duration": 8.0})
                                                for n in ("one", "two")) + "\n")
    assert main(["data", "stats", str(data), "--json", "--plots", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dialogues"] == 2 and out["hours"] == pytest.approx(16 / 3600, abs=1e-4)
    assert out["voices"] == {"moshi": 1, "user": 2}
    assert out["words"] == {M: 10, U: 8}
    assert out["words_per_minute"] == {M: pytest.approx(37.5), U: pytest.approx(30.0)}
    assert out["text_pad_fraction"] == pytest.approx(0.5)
    tt = out["turn_taking"]
    assert tt["gap"]["all"]["count"] == 6 and tt["gap"]["all"]["mean"] == pytest.approx(1.3 / 3, abs=1e-4)
    assert tt["gap"]["all"]["per_minute"] == pytest.approx(6 / (16 / 60), abs=1e-3)
    # Table 9's second unit: cumulated seconds per minute of dialogue (gaps 2 x 1.3 s in 16 s)
    assert tt["gap"]["all"]["seconds_per_minute"] == pytest.approx(2.6 / (16 / 60), abs=1e-3)
    assert tt["overlap"][U]["seconds_per_minute"] == pytest.approx(0.6 / (16 / 60), abs=1e-3)
    assert tt["pause"][M]["mean"] == pytest.approx(0.5) and tt["overlap"]["all"]["median"] == pytest.approx(0.25)
    assert tt["ipu"][M]["count"] == 8 and tt["ipu"][U]["mean"] == pytest.approx(1.9 / 3, abs=1e-4)
    for kind in ("ipu", "pause", "gap", "overlap"):
        assert (tmp_path / "plots" / f"{kind}.png").stat().st_size > 1000
    # the text report of the same folder
    assert main(["data", "stats", str(data / "train.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "2 dialogues" in text and "50.0 % of frames are padding" in text


def test_stats_prints_a_reference_column_beside_the_data_sets_figures(tmp_path, capsys):
    data = tmp_path / "set"
    data.mkdir()
    sf.write(data / "one.wav", np.zeros((8 * 24_000, 2), dtype=np.float32), 24_000)
    (data / "one.json").write_text(json.dumps({"alignments": [[t, [s, e], spk] for t, s, e, spk in WORDS]}))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"name": "hand-made", "events": {"gap": {"per_minute": 12.5,
                                                                        "seconds_per_minute": 4.25}}}))
    assert main(["data", "stats", str(data), "--reference", str(ref)]) == 0
    text = capsys.readouterr().out
    assert "reference: hand-made" in text
    gap_all = next(line for line in text.splitlines() if line.startswith("gap") and " all " in line).split()
    # 1.3 s of gaps in 8 s; the reference's implied mean gap: 4.25 / 12.5 = 0.34 s
    assert gap_all[2:] == ["3", "22.50", "9.75", "0.433", "0.500", "12.50", "4.25", "0.340"]
    pause_all = next(line for line in text.splitlines() if line.startswith("pause") and " all " in line).split()
    assert pause_all[-3:] == ["-", "-", "-"]  # not in the reference
    assert main(["data", "stats", str(data), "--reference", str(ref), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"]["events"]["gap"]["per_minute"] == 12.5
    ref.write_text(json.dumps({"events": {"gaps": {"per_minute": 1}}}))
    assert main(["data", "stats", str(data), "--reference", str(ref)]) == 1
    assert "kinds among" in capsys.readouterr().err


def test_stats_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 1
    assert "no such data set" in capsys.readouterr().err
