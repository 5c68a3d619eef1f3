"""recipes/tiny_talk.py end to end at toy size: every stage runs, its outputs load, a rerun resumes (skips all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmoshi.bundle import load_model

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["scripts", "synth", "mono", "tokenizer", "codec", "encode", "audio", "multistream", "finetune", "sharpen",
          "package", "eval"]


def _recipe(work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "tiny_talk.py"), "--size", "toy", "--work",
                           str(work), "--threads", "1", *extra], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
def test_toy_recipe_runs_every_stage_and_resumes(tmp_path):
    work = tmp_path / "tt"
    first = _recipe(work)
    assert first.returncode == 0, first.stdout + first.stderr
    times = json.loads((work / "times.json").read_text())
    assert list(times) == STAGES and all(t >= 0 for t in times.values())
    # the stages' products: dialogues with held-out test voices, the codec, each LM stage's model folder
    assert (work / "data" / "dialogues" / "train.jsonl").read_text().strip()
    assert (work / "data" / "dialogues" / "test.jsonl").read_text().strip()
    # Moshi answers after the user, never over them (the recipe's turn-taking: no overlaps, backchannels, cut-ins)
    for alignment in (work / "data" / "dialogues" / "train").glob("*.json"):
        words = json.loads(alignment.read_text())["alignments"]
        user = [(a, b) for _, (a, b), who in words if who == "SPEAKER_USER"]
        moshi = [(a, b) for _, (a, b), who in words if who == "SPEAKER_MAIN"]
        assert user and moshi
        assert not [(m, u) for m in moshi for u in user if m[0] < u[1] and u[0] < m[1]], alignment.name
    assert (work / "codec" / "model" / "config.json").is_file()
    # the codec's semantic level learned from the words' phonemes; the user heard through augmented channels
    assert list((work / "codec" / "teacher_cache").glob("*.pt"))
    assert "distill" in (work / "codec" / "metrics.jsonl").read_text()
    index = json.loads(next((work / "codes").glob("*/index.json")).read_text())
    assert index["user_variants"] and set(index["user_variants"].values()) == {1}
    assert json.loads((work / "lm_finetune" / "config.json").read_text())["data"]["augment_user"] is True
    assert json.loads((work / "lm_sharpen_x10" / "config.json").read_text())["loss"]["text_weight"] == 10.0
    for stage in ("audio", "multistream", "finetune", "sharpen_x4", "sharpen_x10"):
        assert (work / f"lm_{stage}" / "model" / "model.safetensors").is_file(), stage
    bundle = load_model(work / "model")
    assert bundle.config.dep_q == 4 and bundle.tokenizer.get_piece_size() <= bundle.config.text_card
    report = json.loads((work / "eval" / "talk.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0
    listening = json.loads((work / "eval" / "listening.json").read_text())
    assert listening["items"] >= 1 and "turn_starts" in listening
    # a rerun finds every stage done and changes nothing
    before = (work / "model" / "model.safetensors").stat().st_mtime_ns
    again = _recipe(work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(": done") == len(STAGES)
    assert (work / "model" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_toy_recipe_continues_from_a_model_folder(tmp_path):
    first = _recipe(tmp_path / "tt", "--until", "package")
    assert first.returncode == 0, first.stdout + first.stderr
    source = tmp_path / "tt" / "model"
    work = tmp_path / "more"
    again = _recipe(work, "--from", str(source), "--until", "package")
    assert again.returncode == 0, again.stdout + again.stderr
    # the codec and tokenizer are the source's, no LM pretraining ran, fine-tuning started from its LM
    assert (work / "tokenizer_tiny_talk.model").read_bytes() == (source / "tokenizer_tiny_talk.model").read_bytes()
    assert not (work / "codec" / "checkpoints").exists() and not (work / "lm_audio").exists()
    assert not (work / "lm_multistream").exists()
    config = json.loads((work / "lm_finetune" / "config.json").read_text())
    assert str(source) in json.dumps(config)
    a, b = load_model(source), load_model(work / "model")
    for (name, p), q in zip(a.mimi.state_dict().items(), b.mimi.state_dict().values()):
        assert torch.equal(p, q), name
    assert b.config.dep_q == a.config.dep_q
    bad = _recipe(tmp_path / "bad", "--from", str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and "--from" in bad.stderr + bad.stdout
