"""LM evaluation on held-out token grids: per-stream cross-entropy, text bits per byte, per-codebook audio
cross-entropy and accuracy, padding fraction.

Text bits per byte = sum of the cross-entropies (nats) of the real text targets (not PAD / EPAD) / ln 2 /
their UTF-8 bytes (a piece's U+2581 counts as a space): comparable across tokenizers.

Listening (`listening=True`, dialogues): greedy accuracy of the first text token of each of Moshi's turns (a token
after at least TURN_GAP frames of padding), with each item's own user audio and with another item's (the batch's
user streams rotated by one). The first word of a reply is where Moshi's text depends most on what the user said:
the gap between the two says how much the model listens; no gap, it answers whatever it heard. The same two
accuracies over every word token of Moshi's text (`word_acc`, `word_acc_other_user`) count the words of a reply
that repeat or answer what was asked ("The capital of France is Paris").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..lm.model import LMModel
from ..train.lm.loss import LMLossConfig, _ce, lm_loss


def _piece_bytes(tokenizer, size: int) -> torch.Tensor:
    """UTF-8 length of every text token (0 for control and unknown tokens) -> long [size]."""
    out = torch.zeros(size, dtype=torch.long)
    for i in range(min(size, tokenizer.get_piece_size())):
        if tokenizer.is_control(i) or tokenizer.is_unknown(i):
            continue
        out[i] = len(tokenizer.id_to_piece(i).replace("\u2581", " ").encode())
    return out


TURN_GAP = 10  # frames (0.8 s) without a text token before the first token of a turn


def turn_starts(text: torch.Tensor, pads: tuple[int, int], gap: int = TURN_GAP) -> torch.Tensor:
    """Text rows [B, T] -> bool [B, T]: the real tokens (not PAD, EPAD or none) that follow at least `gap` frames
    without one. A token in the first `gap` frames of a crop is left out (what came before it is unknown)."""
    real = (text >= 0) & (text != pads[0]) & (text != pads[1])
    out = torch.zeros_like(real)
    for b, row in enumerate(real.tolist()):
        last = None  # frame of the previous real token
        for t, is_real in enumerate(row):
            if is_real:
                out[b, t] = (t - last > gap) if last is not None else t >= gap
                last = t
    return out


@torch.no_grad()
def evaluate_grids(lm: LMModel, grids: Sequence[torch.Tensor], tokenizer, device: torch.device | str = "cpu",
                   batch_size: int = 4, loss_cfg: LMLossConfig | None = None,
                   listening: bool = False) -> dict[str, float]:
    """Metrics of `lm` on token grids [K, T] (text first); sums over every position, then divides. `listening`
    adds the turn-start accuracies with own / another item's user audio (batches of at least two items)."""
    cfg = lm.cfg
    loss_cfg = loss_cfg or LMLossConfig()
    pads = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)
    piece_bytes = _piece_bytes(tokenizer, cfg.text_out).to(device)
    sums: dict[str, float] = {}

    def add(key: str, value: torch.Tensor | float) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    for start in range(0, len(grids), batch_size):
        codes = torch.stack(list(grids[start:start + batch_size])).to(device)
        out = lm(codes)
        loss, _ = lm_loss(out, codes, loss_cfg, pads)
        add("loss", loss * codes.shape[0])
        add("items", codes.shape[0])
        targets = codes[:, :1]
        ce, hits = _ce(out.text_logits, targets, out.text_mask)
        is_pad = (targets == pads[0]) | (targets == pads[1])
        real = out.text_mask & ~is_pad
        add("text_n", out.text_mask.sum())
        add("text_ce_sum", (ce * out.text_mask).sum())
        add("text_hits", hits.sum())
        add("text_pad", (is_pad & out.text_mask).sum())
        add("word_ce_sum", (ce * real).sum())
        add("word_n", real.sum())
        add("word_bytes", (piece_bytes[targets.clamp(0, cfg.text_out - 1)] * real).sum())
        if listening and codes.shape[0] > 1 and cfg.n_q > cfg.dep_q:
            starts = turn_starts(targets[:, 0], pads) & out.text_mask[:, 0]
            swapped = codes.clone()
            swapped[:, 1 + cfg.dep_q:] = codes[:, 1 + cfg.dep_q:].roll(1, 0)
            other = lm(swapped).text_logits.argmax(-1)[:, 0]
            add("turn_n", starts.sum())
            add("turn_hits", (hits[:, 0] & starts).sum())
            add("turn_hits_other", ((other == targets[:, 0]) & starts).sum())
            add("listen_word_n", real[:, 0].sum())
            add("listen_word_hits", (hits[:, 0] & real[:, 0]).sum())
            add("listen_word_hits_other", ((other == targets[:, 0]) & real[:, 0]).sum())
        dep_q = out.audio_logits.shape[1]
        if dep_q:
            ace, ahits = _ce(out.audio_logits, codes[:, 1:1 + dep_q], out.audio_mask)
            for k in range(dep_q):
                add(f"n_cb{k}", out.audio_mask[:, k].sum())
                add(f"ce_cb{k}", (ace[:, k] * out.audio_mask[:, k]).sum())
                add(f"acc_cb{k}", ahits[:, k].sum())
    result = {"loss": sums["loss"] / max(sums["items"], 1)}
    if sums.get("text_n"):
        result["text_ce"] = sums["text_ce_sum"] / sums["text_n"]
        result["text_acc"] = sums["text_hits"] / sums["text_n"]
        result["text_pad_frac"] = sums["text_pad"] / sums["text_n"]
    if sums.get("word_n"):
        result["text_word_ce"] = sums["word_ce_sum"] / sums["word_n"]
    if sums.get("word_bytes"):
        result["text_bpb"] = sums["word_ce_sum"] / math.log(2) / sums["word_bytes"]
    if listening:
        result["turn_starts"] = sums.get("turn_n", 0.0)
        if sums.get("turn_n"):
            result["turn_start_acc"] = sums["turn_hits"] / sums["turn_n"]
            result["turn_start_acc_other_user"] = sums["turn_hits_other"] / sums["turn_n"]
        if sums.get("listen_word_n"):
            result["word_acc"] = sums["listen_word_hits"] / sums["listen_word_n"]
            result["word_acc_other_user"] = sums["listen_word_hits_other"] / sums["listen_word_n"]
    audio_n = sum(sums.get(f"n_cb{k}", 0.0) for k in range(cfg.dep_q))
    if audio_n:
        result["audio_ce"] = sum(sums[f"ce_cb{k}"] for k in range(cfg.dep_q)) / audio_n
        for k in range(cfg.dep_q):
            if sums.get(f"n_cb{k}"):
                result[f"ce_cb{k}"] = sums[f"ce_cb{k}"] / sums[f"n_cb{k}"]
                result[f"acc_cb{k}"] = sums[f"acc_cb{k}"] / sums[f"n_cb{k}"]
    return result
