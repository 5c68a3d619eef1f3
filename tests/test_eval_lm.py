"""`evaluate_grids` listening figures: turn starts found by hand-checked rules, own vs another item's user audio."""

from __future__ import annotations

import json

import pytest
import torch

from openmoshi.bundle import init_model, load_model
from openmoshi.cli.main import main
from openmoshi.eval.lm import evaluate_grids, turn_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P, E = 3, 0  # PAD and EPAD ids of these rows


def test_turn_starts_follow_a_gap_of_padding():
    text = torch.tensor([
        #  0  1  2  3  4  5  6  7  8   9  10  11
        [P, P, 5, P, 6, P, P, P, 7, -1, E, 8],   # 5 at 2: 2 frames before it (kept at gap 2); 6: 1 frame; 7: 3; 8: 2
        [5, P, P, P, 9, 9, P, P, P, P, P, 4],   # 5 at 0: unknown past (left out); 9 at 4: gap 3; 9 at 5: 0; 4: 5
    ])
    got = turn_starts(text, (P, E), gap=2)
    want = torch.zeros_like(got)
    want[0, [2, 8, 11]] = True
    want[1, [4, 11]] = True
    assert torch.equal(got, want)
    assert turn_starts(text, (P, E), gap=3)[0].nonzero().flatten().tolist() == [8]  # 7 alone follows 3 empty frames
    assert not turn_starts(text, (P, E), gap=4)[0].any()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(init_model("tiny", tmp_path_factory.mktemp("m") / "model", seed=3))


def _grid(cfg, seed: int, text_at: dict[int, int], frames: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, cfg.card, (1 + cfg.n_q, frames), generator=g)
    grid[0] = cfg.existing_text_padding_id
    for t, token in text_at.items():
        grid[0, t] = token
    return grid


def test_listening_with_the_same_user_scores_the_same(tiny):
    lm, cfg = tiny.lm.eval(), tiny.lm.cfg
    words = {14: 40, 15: 41, 33: 42, 50: 43}  # turns start at 14, 33 and 50 (gap 10)
    a = _grid(cfg, 1, words)
    same = evaluate_grids(lm, [a, a.clone()], tiny.tokenizer, listening=True)
    assert same["turn_starts"] == 6
    assert same["turn_start_acc"] == same["turn_start_acc_other_user"]
    b = a.clone()
    b[1 + cfg.dep_q:] = _grid(cfg, 2, {})[1 + cfg.dep_q:]  # same Moshi, another user
    mixed = evaluate_grids(lm, [a, b], tiny.tokenizer, listening=True)
    assert mixed["turn_starts"] == 6 and 0 <= mixed["turn_start_acc_other_user"] <= 1
    # the own-user figure is the plain greedy accuracy at those frames
    with torch.no_grad():
        pred = lm(torch.stack([a, b])).text_logits.argmax(-1)[:, 0]
    starts = torch.tensor([14, 33, 50])
    want = (pred[:, starts] == torch.stack([a, b])[:, 0, starts]).float().mean().item()
    assert mixed["turn_start_acc"] == pytest.approx(want)
    # every word token of the text stream: own-user accuracy is the greedy accuracy at the 8 words
    frames = torch.tensor(sorted(words))
    want_words = (pred[:, frames] == torch.stack([a, b])[:, 0, frames]).float().mean().item()
    assert mixed["word_acc"] == pytest.approx(want_words) and same["word_acc"] == same["word_acc_other_user"]
    assert "turn_starts" not in evaluate_grids(lm, [a, b], tiny.tokenizer)


def test_eval_lm_listening_flag(tmp_path, capsys, tiny):
    from dialogue_utils import make_dialogue
    model = init_model("tiny", tmp_path / "model", seed=3)
    manifest, _ = make_dialogue(tmp_path / "d", "talk", moshi=[("hello", 0.2), ("there", 1.4)],
                                user=[("yes", 0.9)], duration=2.0)
    capsys.readouterr()
    assert main(["eval", "lm", "--model", str(model), "--data", str(manifest), str(manifest), "--duration", "2.0",
                 "--listening", "--shuffle", "0", "--batch-size", "2", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    # "there" (1.4 s) follows "hello" (0.2 s) by more than 10 frames: one turn start in each of the two crops
    assert result["items"] == 2 and result["turn_starts"] == 2 and "text_ce" in result


def test_eval_lm_listening_needs_two_crops_per_batch(tmp_path, capsys):
    model = init_model("tiny", tmp_path / "model", seed=3)
    assert main(["eval", "lm", "--model", str(model), "--data", str(tmp_path / "none.jsonl"), "--listening",
                 "--batch-size", "1", "--threads", "1"]) == 1
    assert "--batch-size 2 or more" in capsys.readouterr().err
