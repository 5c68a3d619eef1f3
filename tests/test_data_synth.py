"""Synthetic dialogues: format, channels, splits, exact timings, turn-taking statistics, reproducibility, resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_utils import read_contract_manifest, rms

from openmoshi.data.format import SPEAKER_MAIN, SPEAKER_USER, Word
from openmoshi.data.stats import turn_taking
from openmoshi.data.synth.engines import Speech, Voice, festival_voices, synthesize
from openmoshi.data.synth.pipeline import SynthConfig, synthesize_dataset
from openmoshi.data.synth.scripts import FACTS, MOSHI, USER, fact_split
from openmoshi.data.synth.turns import Duration, PlannedTurn, TurnTaking, plan
from openmoshi.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SR = 24_000
SPLIT_CFG = {"seed": 3, "user_voices": 12, "valid_fraction": 0.25, "test_fraction": 0.25, "exchanges": (2, 3)}


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize_dataset(out, SynthConfig(dialogues=8, **SPLIT_CFG))
    return out


def _all_items(root: Path) -> dict[str, list[dict]]:
    return {split: read_contract_manifest(root / f"{split}.jsonl") for split in ("train", "valid", "test")}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_format_channels_and_rates(synth_set):
    items = [it for split in _all_items(synth_set).values() for it in split]
    assert len(items) == 8
    for it in items:
        assert it["sr"] == SR and it["audio"].shape[1] == 2
        assert abs(it["duration"] - len(it["audio"]) / SR) < 1e-3
        speakers = {w[3] for w in it["words"]}
        assert speakers == {SPEAKER_MAIN, SPEAKER_USER}
        for text, start, end, _ in it["words"]:
            assert text.strip() and 0 <= start < end <= it["duration"] + 1e-4
        starts = [w[1] for w in it["words"]]
        assert starts == sorted(starts)
        # Moshi's words are on the left channel, the user's on the right
        for channel, speaker in ((0, SPEAKER_MAIN), (1, SPEAKER_USER)):
            own = [w for w in it["words"] if w[3] == speaker]
            assert rms(np.concatenate([it["audio"][int(s * SR):int(e * SR), channel] for _, s, e, _ in own])) > 0.03


def test_splits_disjoint_by_dialogue_and_user_voice(synth_set):
    items = _all_items(synth_set)
    assert all(len(v) > 0 for v in items.values()), {k: len(v) for k, v in items.items()}
    names = [it["name"] for v in items.values() for it in v]
    assert len(names) == len(set(names))
    voices = {}
    for split, its in items.items():
        voices[split] = {json.loads(it["wav"].with_suffix(".json").read_text())["meta"]["voices"]["user"]
                         for it in its}
    moshi = {json.loads(it["wav"].with_suffix(".json").read_text())["meta"]["voices"]["moshi"]
             for v in items.values() for it in v}
    assert len(moshi) == 1  # one fixed voice for Moshi
    assert not (voices["train"] & voices["valid"]) and not (voices["train"] & voices["test"])
    assert not (voices["valid"] & voices["test"])


def test_facts_are_held_out_by_split():
    fractions = {"train": 0.8, "valid": 0.1, "test": 0.1}
    by_split = {s: {q for q, _ in FACTS if fact_split(q, fractions) == s} for s in fractions}
    assert by_split["test"] and by_split["train"]
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["valid"])


def test_word_timings_match_speech_energy(synth_set):
    """Every word's interval holds speech; outside its words a channel is (near) silent, gaps included."""
    for split in _all_items(synth_set).values():
        for it in split:
            for channel, speaker in ((0, SPEAKER_MAIN), (1, SPEAKER_USER)):
                sig = it["audio"][:, channel]
                words = sorted((w for w in it["words"] if w[3] == speaker), key=lambda w: w[1])
                mask = np.zeros(len(sig), dtype=bool)
                for _, s, e, _ in words:
                    mask[round(s * SR):round(e * SR)] = True
                speech = rms(sig[mask])
                for text, s, e, _ in words:
                    assert rms(sig[round(s * SR):round(e * SR)]) > 0.1 * speech, (it["name"], text)
                # energy outside this speaker's words: a millionth-scale remainder of trimmed edges
                assert np.sum(sig[~mask] ** 2) < 1e-4 * np.sum(sig ** 2), it["name"]
                for a, b in itertools.pairwise(words):
                    lo, hi = round(a[2] * SR) + 3, round(b[1] * SR) - 3
                    if hi - lo > 48:  # a gap of 2 ms or more between two words of one speaker
                        assert rms(sig[lo:hi]) < 0.05 * speech, (it["name"], a[0], b[0])


def test_festival_voice_timings():
    if not festival_voices():
        pytest.skip("festival is not installed (.ci/run installs it)")
    speech = synthesize([(["What", "is", "seven", "plus", "five?"], Voice("festival", festival_voices()[0]))])[0]
    assert [w[0] for w in speech.words] == ["What", "is", "seven", "plus", "five?"]
    for _, s, e in speech.words:
        assert e > s and rms(speech.audio[int(s * SR):int(e * SR)]) > 0.1 * rms(speech.audio)
    assert speech.words[-1][2] == pytest.approx(speech.duration, abs=1e-3)


def test_espeak_is_deterministic_and_words_follow_the_text():
    jobs = [(["Hello", "there,"], Voice.parse("espeak:en-us+m3:p40:r160")),
            (["what", "is", "seven", "plus", "five?"], Voice.parse("espeak:en+f2:p60:r180:g70"))]
    a, b = synthesize(jobs), synthesize(jobs)
    for x, y, (words, _) in zip(a, b, jobs):
        assert np.array_equal(x.audio, y.audio) and x.words == y.words
        assert [w[0] for w in x.words] == words
        assert all(e > s for _, s, e in x.words) and x.words[0][1] == 0.0
        assert x.words[-1][2] == pytest.approx(x.duration, abs=1e-6)


def test_espeak_words_in_other_languages():
    words = ["économie", "très", "bien", "été"]
    speech = synthesize([(words, Voice.parse("espeak:fr+m2"))])[0]
    assert [w[0] for w in speech.words] == words  # character positions, not bytes, map events to words
    starts = [w[1] for w in speech.words]
    assert starts == sorted(starts) and len(set(starts)) == 4


def test_missing_festival_degrades_to_espeak(monkeypatch):
    from openmoshi.data.synth import engines, voices
    monkeypatch.setenv("PATH", "/nonexistent")
    engines.festival_available.cache_clear()
    engines.festival_voices.cache_clear()
    try:
        pool = voices.user_voice_pool(30, seed=0)
        assert len(pool) == 30 and all(v.engine == "espeak" for v in pool)
        french = voices.user_voice_pool(10, seed=0, accents=("fr",))
        assert all(v.name.startswith("fr+") for v in french)
    finally:
        monkeypatch.undo()
        engines.festival_available.cache_clear()
        engines.festival_voices.cache_clear()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = {"dialogues": 2, "user_voices": 6, "exchanges": (1, 2)}
    synthesize_dataset(tmp_path / "a", SynthConfig(seed=5, **cfg))
    synthesize_dataset(tmp_path / "b", SynthConfig(seed=5, **cfg), workers=2)
    synthesize_dataset(tmp_path / "c", SynthConfig(seed=6, **cfg))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    wavs = [k for k in a if k.endswith(".wav")]
    assert wavs and all(a[k] != c.get(k) for k in wavs)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(synth_set, tmp_path):
    """SIGKILL the command mid-run, run it again: the set is byte for byte the uninterrupted one."""
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "openmoshi", "data", "synth", "--out", str(out), "--dialogues", "8",
           "--seed", "3", "--user-voices", "12", "--valid-fraction", "0.25", "--test-fraction", "0.25",
           "--exchanges", "2,3", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("dialogue_*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made = len(list(out.rglob("dialogue_*.json")))
    assert 2 <= made < 8, made
    assert not (out / "train.jsonl").exists()  # manifests come at the end
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert _files(out) == _files(synth_set)  # half-written temporary files are gone too


def test_data_command_lists_its_subcommands(capsys):
    from openmoshi.cli.main import main
    assert main(["data"]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("synth", "align", "stats", "tokenizer"))


def test_resume_with_other_settings_is_refused(synth_set):
    with pytest.raises(ConfigError, match="other settings"):
        synthesize_dataset(synth_set, SynthConfig(dialogues=8, **{**SPLIT_CFG, "seed": 4}))


def test_user_jsonl_dialogues(tmp_path):
    script = tmp_path / "d.jsonl"
    lines = [{"turns": [{"speaker": "user", "text": "Hello there, robot."},
                        {"speaker": "moshi", "text": "Hi. I am listening."}], "split": "test"},
             {"turns": [{"speaker": "SPEAKER_MAIN", "text": "Good morning."},
                        {"speaker": "user", "text": "Morning!"}]}]
    script.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    tt = TurnTaking(user_interrupt_prob=0, moshi_interrupt_prob=0, backchannel_prob=0)
    synthesize_dataset(tmp_path / "out", SynthConfig(dialogues=2, script_file=str(script), user_voices=6,
                                                     valid_fraction=0, test_fraction=0.1, turn_taking=tt))
    test = read_contract_manifest(tmp_path / "out" / "test.jsonl")
    assert len(test) >= 1
    words = test[0]["words"]
    assert " ".join(w[0] for w in words if w[3] == SPEAKER_USER) == "Hello there, robot."
    assert " ".join(w[0] for w in words if w[3] == SPEAKER_MAIN) == "Hi. I am listening."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": [{"who": "user"}]}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        synthesize_dataset(tmp_path / "bad", SynthConfig(dialogues=1, script_file=str(bad)))


@pytest.mark.slow
def test_turn_taking_distributions_match_configuration(tmp_path):
    """Measured (from the written alignments) gaps, pauses and overlaps follow the configured distributions."""
    from scipy.stats import ks_2samp

    pause = Duration(0.6, 0.25, 0.3, 1.5)
    tt = TurnTaking(gap=Duration(0.5, 0.3, 0.05, 1.5), overlap_prob=0.3, overlap=Duration(0.2, 0.06, 0.08, 0.3),
                    pause=pause, comma_pause=pause, user_interrupt_prob=0, moshi_interrupt_prob=0,
                    backchannel_prob=0)
    synthesize_dataset(tmp_path, SynthConfig(dialogues=12, seed=11, user_voices=6, exchanges=(4, 6),
                                             turn_taking=tt))
    measured = {"gap": [], "pause": [], "overlap": []}
    counts = {"gap": 0, "overlap": 0}
    for js in tmp_path.rglob("dialogue_*.json"):
        obj = json.loads(js.read_text())
        words = [Word(t, s, e, spk) for t, (s, e), spk in obj["alignments"]]
        ev = turn_taking(words)
        for kind in measured:
            measured[kind] += ev.values(kind)
        for kind in counts:
            counts[kind] += obj["meta"]["events"][kind]
    rng = np.random.default_rng(0)
    for kind, dist in (("gap", tt.gap), ("pause", tt.pause), ("overlap", tt.overlap)):
        got = np.array(measured[kind])
        ref = dist.sample(rng, 20_000)
        assert len(got) >= 30, (kind, len(got))
        assert abs(got.mean() - ref.mean()) < 0.12 * ref.mean(), (kind, got.mean(), ref.mean())
        assert ks_2samp(got, ref).pvalue > 1e-3, (kind, ks_2samp(got, ref))
    share = counts["overlap"] / (counts["overlap"] + counts["gap"])
    assert abs(share - tt.overlap_prob) < 0.12, share
    # `data stats` reports the same set in Table 9's units: events and cumulated seconds per minute
    from openmoshi.data.stats import dataset_stats
    summary = dataset_stats(tmp_path).summary()
    minutes = summary["hours"] * 60
    for kind, dist in (("gap", tt.gap), ("pause", tt.pause), ("overlap", tt.overlap)):
        row = summary["turn_taking"][kind]["all"]
        assert row["count"] == len(measured[kind])
        assert row["per_minute"] == pytest.approx(len(measured[kind]) / minutes, rel=1e-3)
        assert row["seconds_per_minute"] == pytest.approx(sum(measured[kind]) / minutes, rel=1e-3)
        assert abs(row["mean"] - dist.sample(rng, 20_000).mean()) < 0.12 * dist.mean


def _fake_speech(words: list[str], word_s: float = 0.3) -> Speech:
    n = int(word_s * SR)
    audio = np.concatenate([0.1 * np.sin(np.arange(n) * 0.05 * (k + 1)) for k in range(len(words))])
    return Speech(audio.astype(np.float32), [(w, k * word_s, (k + 1) * word_s) for k, w in enumerate(words)])


def test_interruptions_and_backchannels():
    """A barge-in stops the speaker within the reaction time plus one word, and drops the rest of the turn;
    backchannels fall inside the other's turn and never overlap the listener's own speech."""
    tt = TurnTaking(user_interrupt_prob=1.0, moshi_interrupt_prob=0.0, overlap_prob=0.0, backchannel_prob=1.0,
                    reaction=Duration(0.3, 0.1, 0.2, 0.5))
    cuts = 0
    for seed in range(20):
        turns = []
        for k in range(6):
            who = MOSHI if k % 2 == 0 else USER
            chunks = [_fake_speech([f"w{k}_{c}_{i}" for i in range(5)]) for c in range(3)]
            turns.append(PlannedTurn(who, chunks, ["sentence", "comma"]))
        bcs = {MOSHI: [_fake_speech(["mhm"], 0.25)], USER: [_fake_speech(["yeah"], 0.25)]}
        segments, total, counts = plan(turns, bcs, tt, np.random.default_rng(seed))
        cuts += counts["interruption"]
        for who in (MOSHI, USER):
            own = sorted((s.start, s.end) for s in segments if s.speaker == who)
            assert all(b[0] >= a[1] for a, b in itertools.pairwise(own)), "a channel overlaps itself"
        assert total >= max(s.end for s in segments)
        moshi_words = [w for s in segments if s.speaker == MOSHI and s.kind == "speech" for w in s.speech.words]
        for k in (0, 2, 4):  # Moshi's turns: a prefix of the script, then the user's turn k+1 starts
            said = [w for w in moshi_words if w[0].startswith(f"w{k}_")]
            user_next = [s for s in segments if s.speaker == USER and s.kind == "speech"
                         and s.speech.words[0][0].startswith(f"w{k + 1}_")]
            if len(said) < 15 and user_next:
                moshi_end = max(s.end for s in segments if s.speaker == MOSHI and s.kind == "speech"
                                and s.speech.words[0][0].startswith(f"w{k}_"))
                barge = user_next[0].start
                assert barge < moshi_end <= barge + int((0.5 + 0.3) * SR) + 1
    assert cuts >= 40  # nearly every Moshi turn was interrupted
