"""The LM's training loss: text cross-entropy + weighted mean of Moshi's audio cross-entropies.

    loss = text_weight * CE_text + audio_weight * sum_k sum_t w_k ce_k,t / sum_k sum_t w_k      (k: Moshi's codebooks)

w_k = semantic_weight for the first codebook, acoustic_weight for the others (Moshi: 100 and 1); text targets
that are PAD or EPAD count pad_weight (0.5). Positions without a target (-1, the tail of delayed streams) count 0.
The user's streams are inputs only: the model predicts Moshi's dep_q codebooks (an optional auxiliary head,
`user_text_loss`, transcribes the user's words from the temporal transformer's output). Every masked position still
takes part in the graph with weight 0, so every parameter gets a gradient (DDP needs it) even on text-only
batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ...lm.model import LMOutput


@dataclass
class LMLossConfig:
    text_weight: float = 1.0  # weight of the text cross-entropy in the total
    audio_weight: float = 1.0  # weight of the audio cross-entropy in the total
    semantic_weight: float = 100.0  # first (semantic) codebook, inside the audio mean
    acoustic_weight: float = 1.0  # the other codebooks, inside the audio mean
    pad_weight: float = 0.5  # text targets that are PAD or EPAD
    # Auxiliary loss, training only: a linear head on the temporal transformer transcribes the *user's* words
    # (data.user_text_delay late). Dense supervision of listening; the head is not exported. 0 = off.
    user_text_weight: float = 0.0

    def __post_init__(self) -> None:
        if min(self.text_weight, self.audio_weight, self.semantic_weight, self.acoustic_weight, self.pad_weight,
               self.user_text_weight) < 0:
            raise ValueError("loss weights must be >= 0")


def _ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy and argmax hits: logits [..., V], targets [...] -> ([...], [...] bool), zero
    where mask is False. Only the valid rows go through the softmax (masked ones may hold NaN)."""
    rows = logits[mask]  # [N, V]
    ce_rows = F.cross_entropy(rows.float(), targets[mask], reduction="none")
    ce = torch.zeros(mask.shape, dtype=ce_rows.dtype, device=logits.device).masked_scatter(mask, ce_rows)
    with torch.no_grad():
        hits = torch.zeros_like(mask).masked_scatter(mask, rows.argmax(-1) == targets[mask])
    return ce, hits


def _text_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, cfg: LMLossConfig,
               pad_ids: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text cross-entropy averaged over `mask` with PAD / EPAD targets at pad_weight -> (loss, per-position ce,
    hits, is_pad)."""
    ce, hits = _ce(logits, targets, mask)
    is_pad = (targets == pad_ids[0]) | (targets == pad_ids[1])
    w = mask.float() * torch.where(is_pad, cfg.pad_weight, 1.0)
    return (ce * w).sum() / w.sum().clamp(min=1e-8), ce, hits, is_pad


def lm_loss(out: LMOutput, codes: torch.Tensor, cfg: LMLossConfig, pad_ids: tuple[int, int],
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of teacher-forced outputs on codes [B, 1 + n_q, T]; returns (loss, detached metrics).

    Metrics: text_ce (nats, unweighted mean over real text targets), text_acc, text_pad_frac (share of PAD/EPAD
    targets), audio_ce (the weighted mean), ce_cb{k} and acc_cb{k} for each of Moshi's codebooks."""
    dep_q = out.audio_logits.shape[1]
    text_mask = out.text_mask
    text_loss, text_ce, text_hits, is_pad = _text_loss(out.text_logits, codes[:, :1], text_mask, cfg, pad_ids)

    audio_targets = codes[:, 1:1 + dep_q]
    audio_ce, audio_hits = _ce(out.audio_logits, audio_targets, out.audio_mask)
    per_cb = torch.full((dep_q,), cfg.acoustic_weight, device=codes.device)
    per_cb[:1] = cfg.semantic_weight
    audio_w = out.audio_mask.float() * per_cb.view(1, -1, 1)
    audio_loss = (audio_ce * audio_w).sum() / audio_w.sum().clamp(min=1e-8)
    loss = cfg.text_weight * text_loss + cfg.audio_weight * audio_loss

    metrics: dict[str, torch.Tensor] = {"loss": loss.detach(), "text_loss": text_loss.detach(),
                                        "audio_loss": audio_loss.detach()}
    with torch.no_grad():  # the same keys on every batch, so processes average the same metrics
        n_text = text_mask.sum().clamp(min=1)
        metrics["text_ce"] = (text_ce * text_mask).sum() / n_text
        metrics["text_acc"] = text_hits.sum() / n_text
        metrics["text_pad_frac"] = (is_pad & text_mask).sum() / n_text
        if dep_q:
            counts = out.audio_mask.sum(dim=(0, 2)).clamp(min=1)
            metrics["audio_ce"] = (audio_ce * out.audio_mask).sum() / counts.sum()
            for k in range(dep_q):
                metrics[f"ce_cb{k}"] = (audio_ce[:, k] * out.audio_mask[:, k]).sum() / counts[k]
                metrics[f"acc_cb{k}"] = audio_hits[:, k].sum() / counts[k]
    return loss, metrics


def user_text_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LMLossConfig, pad_ids: tuple[int, int],
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The auxiliary transcription of the user: logits [B, T, V] of step t, targets [B, T] (the user's text
    stream, -1 = none) -> (weighted loss, metrics user_text_ce and user_word_acc: accuracy on word tokens)."""
    mask = targets != -1
    loss, ce, hits, is_pad = _text_loss(logits, targets.clamp(min=0), mask, cfg, pad_ids)
    with torch.no_grad():
        words = mask & ~is_pad
        metrics = {"user_text_ce": (ce * mask).sum() / mask.sum().clamp(min=1),
                   "user_word_acc": (hits & words).sum() / words.sum().clamp(min=1)}
    return cfg.user_text_weight * loss, metrics
