"""LM evaluation on held-out token grids: per-stream cross-entropy, text bits per byte, per-codebook audio
cross-entropy and accuracy, padding fraction.

Text bits per byte = sum of the cross-entropies (nats) of the real text targets (not PAD / EPAD) / ln 2 /
their UTF-8 bytes (a piece's U+2581 counts as a space): comparable across tokenizers.
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


@torch.no_grad()
def evaluate_grids(lm: LMModel, grids: Sequence[torch.Tensor], tokenizer, device: torch.device | str = "cpu",
                   batch_size: int = 4, loss_cfg: LMLossConfig | None = None) -> dict[str, float]:
    """Metrics of `lm` on token grids [K, T] (text first); sums over every position, then divides."""
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
    audio_n = sum(sums.get(f"n_cb{k}", 0.0) for k in range(cfg.dep_q))
    if audio_n:
        result["audio_ce"] = sum(sums[f"ce_cb{k}"] for k in range(cfg.dep_q)) / audio_n
        for k in range(cfg.dep_q):
            if sums.get(f"n_cb{k}"):
                result[f"ce_cb{k}"] = sums[f"ce_cb{k}"] / sums[f"n_cb{k}"]
                result[f"acc_cb{k}"] = sums[f"acc_cb{k}"] / sums[f"n_cb{k}"]
    return result
