"""`openmoshi eval talk`: scoring on hand-made cases (numbers worked out by hand below), held-out voices and cases,
and the command end to end on a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile

from openmoshi.cli.main import main
from openmoshi.data.synth.engines import espeak_available
from openmoshi.data.synth.pipeline import SynthConfig
from openmoshi.data.synth.talk import PHRASINGS, Question, eval_questions
from openmoshi.data.synth.voices import make_voice_bank
from openmoshi.eval.talk import (
    CaseScore,
    audio_threshold,
    build_cases,
    contains_answer,
    frame_rms,
    held_out_voices,
    normalize_text,
    piece_text,
    score_case,
    speech_frames,
    summarize,
    words_from_pieces,
)

RATE = 12.5  # frames per second: frame f covers [0.08 f, 0.08 (f + 1))
PERU = Question("capital", "Tell me the capital of Peru.", "The capital of Peru is Lima.", "lima")
# the question spans [1.0, 2.0) s: frames 12 (0.96-1.04) .. 24 (1.92-2.00) overlap it, 13 frames
USER_WORDS = [("Tell", 1.0, 1.3), ("me", 1.3, 1.5), ("the", 1.5, 1.6), ("capital", 1.6, 1.8), ("of", 1.8, 1.85),
              ("Peru.", 1.85, 2.0)]


def pieces_with(at: dict[int, str], frames: int = 40) -> list[str | None]:
    return [at.get(f) for f in range(frames)]


REPLY = {27: "\u2581The", 28: "\u2581capital", 29: "\u2581of", 30: "\u2581Pe", 31: "ru", 32: "\u2581is"}


def test_text_normalisation_and_whole_word_matching():
    assert normalize_text("The capital of Peru is LIMA!") == "the capital of peru is lima"
    assert normalize_text("3 plus 9 is 12.") == "three plus nine is twelve"
    assert contains_answer("Three plus nine is 12.", "twelve")
    assert contains_answer("It's ... Lima.", "lima")
    assert not contains_answer("Limassol is far", "lima")
    assert not contains_answer("seventeen", "seven")
    assert contains_answer("twenty-one", "twenty one")
    assert not contains_answer("", "lima")
    # The answer said beyond the question's own words: a reply naming only the subject does not count.
    assert not contains_answer("An orange is yellow.", "orange", "Tell me what color an orange is.")
    assert contains_answer("An orange is orange.", "orange", "Tell me what color an orange is.")
    assert contains_answer("Snow is white.", "white", "What color is snow?")


def test_words_from_pieces_and_user_speech_frames():
    words = words_from_pieces(pieces_with({3: "\u2581Pe", 4: "ru", 6: "\u2581is", 7: "."}))
    assert [(w.text, w.frame) for w in words] == [("Peru", 3), ("is.", 6)]
    # byte-fallback pieces (a tokenizer trained on a small corpus spells digits so) read as their characters
    digits = [piece_text(p, p.startswith("<0x")) for p in ("\u2581", "<0x31>", "<0x32>", "<0xC3>", "!")]
    assert digits == ["\u2581", "1", "2", "", "!"]
    assert contains_answer(" ".join(w.text for w in words_from_pieces(digits)), "twelve")
    assert speech_frames(USER_WORDS, RATE, 40) == list(range(12, 25))
    assert speech_frames([("a", 0.1, 0.16)], RATE, 40) == [1]  # [0.10, 0.16) lies inside frame 1 (0.08-0.16)
    assert speech_frames([("a", 0.1, 0.17)], RATE, 2) == [1]  # frame 2 would overlap but the case has 2 frames


def test_correct_answer_with_a_word_during_the_question():
    pieces = pieces_with({5: "\u2581Hello", 20: "\u2581um", **REPLY, 33: "\u2581Lima", 34: "."})
    s = score_case(pieces, RATE, PERU, USER_WORDS, 1.0, 2.0)
    assert s.reply == "um The capital of Peru is Lima."  # "Hello" (frame 5) came before the question started
    assert s.transcript.startswith("Hello um")
    assert s.correct and not s.answered_early
    assert s.onset_s == pytest.approx(27 * 0.08 - 2.0)  # first word after frame 25: "The" at 2.16 s -> 0.16 s
    assert (s.user_frames, s.silent_text) == (13, 12)  # "um" in frame 20 is the one frame Moshi spoke over the user
    assert s.silent_audio is None


def test_wrong_answer_and_a_look_alike_word():
    s = score_case(pieces_with({**REPLY, 33: "\u2581Lim", 34: "as", 35: "sol"}), RATE, PERU, USER_WORDS, 1.0, 2.0)
    assert s.reply == "The capital of Peru is Limassol"
    assert not s.correct
    assert s.silent_text == 13


def test_answer_before_the_question_ends_counts_as_correct_but_early_and_unanswered_after():
    s = score_case(pieces_with({22: "\u2581Lima"}), RATE, PERU, USER_WORDS, 1.0, 2.0)
    assert s.correct and s.answered_early
    assert s.onset_s is None  # no word starts in the end's frame (25) or later
    assert (s.user_frames, s.silent_text) == (13, 12)


def test_onset_is_zero_for_a_word_in_the_frame_holding_the_end():
    # the question ends at 2.03 s, inside frame 25 (2.00-2.08): a word there answers at once
    s = score_case(pieces_with({25: "\u2581Lima"}), RATE, PERU, USER_WORDS, 1.0, 2.03)
    assert s.onset_s == 0.0 and s.correct and not s.answered_early
    s = score_case(pieces_with({26: "\u2581Lima"}), RATE, PERU, USER_WORDS, 1.0, 2.03)
    assert s.onset_s == pytest.approx(2.08 - 2.03)


def test_audio_speech_frames_and_threshold():
    rms = frame_rms(np.array([1, 1, 1, 1, 0, 0, 0, 0, 2, 2], dtype=np.float32), 4)
    np.testing.assert_allclose(rms, [1.0, 0.0, 2.0])  # the last frame is measured over its 2 samples
    assert audio_threshold([np.full(20, 0.1)]) == pytest.approx(0.01)  # 20 dB under a level of 0.1
    assert audio_threshold([np.zeros(20)]) == pytest.approx(10 ** (-50 / 20))  # a silent Moshi: the floor
    # 95th percentile of [0, 0.2 x 19] is 0.2 -> threshold 0.02
    assert audio_threshold([np.zeros(1), np.full(19, 0.2)]) == pytest.approx(0.02)
    speaking = [False] * 40
    speaking[12] = speaking[13] = speaking[30] = True
    s = score_case(pieces_with({}), RATE, PERU, USER_WORDS, 1.0, 2.0, speaking_audio=speaking)
    assert (s.user_frames, s.silent_text, s.silent_audio) == (13, 13, 11)
    assert s.onset_audio_s == pytest.approx(30 * 0.08 - 2.0)  # first speech frame from frame 25 on: 30


def _score(kind: str, correct: bool, onset: float | None, user: int, silent: int, early: bool = False) -> CaseScore:
    return CaseScore(kind, "q", "a", "v", "", "", correct, early, onset, user, silent, silent - 1)


def test_summary_over_cases():
    scores = [_score("colour", True, 0.16, 10, 10), _score("colour", False, 0.4, 10, 9),
              _score("plus", True, 1.2, 20, 19, early=True), _score("plus", True, None, 10, 10)]
    s = summarize(scores)
    assert s["cases"] == 4 and s["accuracy"] == 0.75
    assert s["accuracy_by_kind"] == {"colour": 0.5, "plus": 1.0}
    assert s["cases_by_kind"] == {"colour": 2, "plus": 2}
    assert s["user_speech_frames"] == 50
    assert s["silent_share_text"] == pytest.approx(48 / 50)  # pooled over frames, not averaged over cases
    assert s["silent_share_audio"] == pytest.approx(44 / 50)
    assert s["onset_median_s"] == pytest.approx(0.4)
    assert s["onset_p90_s"] == pytest.approx(0.4 + 0.8 * (1.2 - 0.4))  # linear: position 0.9 * 2 = 1.8
    assert (s["answered"], s["unanswered"], s["answered_early"]) == (3, 1, 1)
    assert s["onset_audio_median_s"] is None  # no case had an audio onset
    assert s["meets_targets"] == {"accuracy": False, "silent_share_text": True, "onset_median_s": True}


def test_held_out_voices():
    default_train = {v.key for v in make_voice_bank(48, 0, SynthConfig(dialogues=1).fractions).users["train"]}
    voices = held_out_voices(None, count=8, seed=0)
    assert len({v.key for v in voices}) == 8 and not {v.key for v in voices} & default_train
    assert [v.key for v in held_out_voices(None, count=8, seed=0)] == [v.key for v in voices]


def test_voices_from_a_synth_set_are_its_test_voices(tmp_path):
    cfg = SynthConfig(dialogues=10, seed=3, user_voices=12, test_fraction=0.2, engines=("espeak",))
    (tmp_path / "synth_config.json").write_text(json.dumps(cfg.identity()))
    bank = make_voice_bank(12, 3, cfg.fractions, cfg.moshi_voice, cfg.engines, cfg.accents)
    got = held_out_voices(tmp_path)
    assert [v.key for v in got] == [v.key for v in bank.users["test"]] and len(got) == 2
    assert not {v.key for v in got} & {v.key for v in bank.users["train"]}


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_cases_are_silence_question_silence():
    questions = eval_questions(2, seed=0)
    cases = build_cases(questions, held_out_voices(None, count=2))
    for case, q in zip(cases, questions):
        assert case.question == q and case.voice
        lead, end = round(1.0 * 24_000), round(case.end * 24_000)
        assert case.start == pytest.approx(1.0, abs=1e-6)
        assert len(case.audio) == end + 4 * 24_000
        assert not np.any(case.audio[:lead]) and not np.any(case.audio[end:])
        rms_db = 20 * math.log10(float(np.sqrt(np.mean(case.audio[lead:end].astype(np.float64) ** 2))))
        assert rms_db == pytest.approx(-20.0, abs=0.5)
        assert len(case.words) == len(q.text.split())
        assert case.words[-1][2] == pytest.approx(case.end)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from openmoshi.bundle import init_model
    return init_model("tiny", tmp_path_factory.mktemp("talk") / "tiny", seed=0)


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_eval_talk_end_to_end_on_a_tiny_model(tiny_model, tmp_path, capsys):
    args = ["eval", "talk", "--model", str(tiny_model), "--cases", "2", "--threads", "1", "--greedy", "--json"]
    assert main([*args, "--save-audio", str(tmp_path / "audio")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cases"] == 2 and len(out["per_case"]) == 2 and 1 <= len(out["examples"]) <= 2
    assert 0.0 <= out["accuracy"] <= 1.0
    assert set(out["accuracy_by_kind"]) <= set(PHRASINGS)
    assert out["user_speech_frames"] > 10
    for key in ("silent_share_text", "silent_share_audio"):
        assert 0.0 <= out[key] <= 1.0
    assert out["answered"] + out["unanswered"] == 2
    if out["answered"]:
        assert 0.0 <= out["onset_median_s"] <= out["onset_p90_s"] <= 4.1
    assert out["targets"] == {"accuracy": 0.8, "silent_share_text": 0.95, "onset_median_s": 1.0}
    assert out["settings"]["generation"]["temp"] == 0.0 and out["codec"] is None
    for case in out["per_case"]:
        assert case["kind"] in PHRASINGS and case["silent_text"] <= case["user_frames"]
    wavs = sorted((tmp_path / "audio").glob("*.wav"))
    assert len(wavs) == 2
    data, rate = soundfile.read(wavs[0])
    assert rate == 24_000 and data.shape[1] == 2 and len(data) > 5 * 24_000
    # greedy: a case's answer does not depend on the batch it ran in
    assert main([*args, "--batch-size", "1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["per_case"] == out["per_case"]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_eval_talk_table_and_codec_figures(tiny_model, speech_files, capsys):
    args = ["eval", "talk", "--model", str(tiny_model), "--cases", "1", "--threads", "1", "--quiet",
            "--codec-data", str(speech_files[0]), "--codec-codebooks", "2", "--codec-seconds", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "answers correct" in text and "silent in user speech (text)" in text and "mel_distance" in text
    assert [line.split() for line in text.splitlines() if "codebooks" in line] == [["codebooks", "2"]]
    assert "Tell me" in text  # an example transcript


def test_codec_figures_equal_eval_codec(tiny_model, speech_files):
    from openmoshi.bundle import load_model
    from openmoshi.eval.codec import evaluate_codec
    from openmoshi.eval.talk import codec_figures

    bundle = load_model(tiny_model)
    mine = codec_figures(bundle.mimi, [speech_files[0]], seconds=1.5, num_codebooks=3)
    ref = evaluate_codec(tiny_model / bundle.config.mimi_name, [speech_files[0]], num_codebooks=3, seconds=1.5,
                         progress=False)
    assert mine["codebooks"] == 3 and bundle.mimi.num_codebooks == 8  # restored after
    shared = {"mel_distance", "stft_distance", "si_sdr", "l1", "stoi", "pesq_wb"} & set(ref)  # PESQ/STOI if installed
    assert {"mel_distance", "si_sdr"} <= shared <= set(mine)
    for key in shared:
        assert mine[key] == pytest.approx(ref[key], rel=1e-6), key


@pytest.mark.parametrize("extra, message", [
    (["--cases", "0"], "--cases must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--voices-from", "/nonexistent/set"], "--voices-from"),
    (["--codec-data", "/nonexistent/wavs"], "--codec-data"),
    (["--codec-codebooks", "99"], "--codec-codebooks must be in 1.."),
])
def test_bad_arguments_are_clear_errors(tiny_model, extra, message, capsys):
    assert main(["eval", "talk", "--model", str(tiny_model), *extra]) == 1
    assert message in capsys.readouterr().err


def test_only_dialogue_models_are_evaluated():
    from types import SimpleNamespace

    from openmoshi.errors import ConfigError
    from openmoshi.eval.talk import check_dialogue_model

    with pytest.raises(ConfigError, match="needs a Moshi dialogue model"):
        check_dialogue_model(SimpleNamespace(source="tts-folder", config=SimpleNamespace(model_type="tts")))


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "talk", "--model", str(tmp_path / "nope"), "--cases", "1"]) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_train_split_is_a_diagnostic_on_training_phrasings_and_voices(tmp_path):
    from openmoshi.data.synth.talk import eval_questions
    from openmoshi.data.synth.voices import make_voice_bank
    from openmoshi.eval.talk import held_out_voices
    def template_start(kind: str, split: str) -> set[str]:  # each phrasing's words before its first field
        return {p.split("{")[0] for p in PHRASINGS[kind][split]}

    questions = eval_questions(8, 0, "train")
    assert {q.kind for q in questions} == set(PHRASINGS)
    assert all(any(q.text.startswith(t) for t in template_start(q.kind, "train")) for q in questions)
    assert not any(q.text.startswith("Tell me") for q in questions)
    assert all(q.text.startswith("Tell me") for q in eval_questions(8, 0))
    settings = {"user_voices": 12, "seed": 3, "valid_fraction": 0.1, "test_fraction": 0.1}
    (tmp_path / "synth_config.json").write_text(json.dumps(settings))
    bank = make_voice_bank(12, 3, {"train": 0.8, "valid": 0.1, "test": 0.1})
    train = held_out_voices(tmp_path, count=3, split="train")
    assert [v.key for v in train] == [v.key for v in bank.users["train"][:3]]
    assert [v.key for v in held_out_voices(tmp_path)] == [v.key for v in bank.users["test"]]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_voices_and_phrasings_split_apart(tiny_model, tmp_path, capsys):
    from openmoshi.data.synth.voices import make_voice_bank
    settings = {"user_voices": 12, "seed": 3, "engines": ["espeak"], "valid_fraction": 0.1, "test_fraction": 0.1}
    (tmp_path / "synth_config.json").write_text(json.dumps(settings))
    train_voices = {v.key for v in make_voice_bank(12, 3, {"train": 0.8, "valid": 0.1, "test": 0.1},
                                                   engines=("espeak",)).users["train"]}
    args = ["eval", "talk", "--model", str(tiny_model), "--cases", "2", "--threads", "1", "--greedy",
            "--voices-from", str(tmp_path), "--voices", "train"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["split"] == "test" and out["settings"]["voice_split"] == "train"
    assert all(case["question"].startswith("Tell me") for case in out["per_case"])  # held-out phrasings ...
    assert {case["voice"] for case in out["per_case"]} <= train_voices  # ... in voices the model trained on
    assert main(args) == 0
    assert "held-out phrasings, training voices" in capsys.readouterr().out
    assert main(["eval", "talk", "--model", str(tiny_model), "--voices", "train"]) == 1
    assert "--voices train needs --voices-from" in capsys.readouterr().err
