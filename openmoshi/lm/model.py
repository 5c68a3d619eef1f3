"""Moshi's language model: an RQ-Transformer over one text stream and n_q audio streams.

The temporal transformer (Helium) runs once per 80 ms frame on the sum of the embeddings of all streams.
From its output, the depth transformer (depformer) produces the dep_q generated audio codebooks of the frame
one after the other, each step fed the token of the previous codebook (the text token for the first one).
Parameter names equal the keys of Kyutai's checkpoints.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import fast
from ..nn.streaming import StreamingModule
from ..nn.transformer import Transformer, make_norm
from .conditioners import Condition, ConditionFuser, ConditionProvider
from .config import LMConfig
from .delays import delay_codes, undelay

NO_TOKEN = -1  # an input with no token: zero embedding, and no loss
UNGENERATED = -2  # a position of the token grid not generated yet


@dataclass
class LMOutput:
    """Teacher-forced predictions, aligned with the input codes (no shift needed for a loss).

    Invalid positions (the tail of delayed streams, inputs equal to -1) hold NaN and are False in the masks.
    """

    text_logits: torch.Tensor  # [B, 1, T, text_card_out]
    text_mask: torch.Tensor  # [B, 1, T] bool
    audio_logits: torch.Tensor  # [B, dep_q, T, card]
    audio_mask: torch.Tensor  # [B, dep_q, T] bool
    hidden: torch.Tensor | None = None  # [B, T, dim] temporal output of step t (it has seen codes[..., :t])


def drop_pages(mapped: torch.Tensor) -> None:
    """Unmap the resident pages of a tensor mapped from a file (madvise DONTNEED: the next read maps them
    again from the file cache); pages it shares with the tensors beside it in the file are read again too."""
    import ctypes
    import mmap
    start = mapped.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = mapped.data_ptr() + mapped.nbytes - start
    if sys.platform.startswith("linux") and _libc() is not None:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 4)  # MADV_DONTNEED (Linux)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


class TokenEmbedding(nn.Embedding):
    """Embedding of tokens [...] -> [..., dim] where the token -1 means "no token" (a zero vector).

    low_rank: rows of that width, projected to dim by `low_rank` (Kyutai's depformer_low_rank_embeddings).
    demux: a token muxes two streams as (second + 1) * num_embeddings + first (second = -1: none); each is
    looked up in the same table and projected by its own matrix (`out1`, `out2`), then summed (the TTS models'
    second text stream).

    `row_dtype`: when set, the table is kept in a narrower float dtype than the model computes in (a bf16
    checkpoint's table in an fp32 model: half the memory) and the rows looked up are cast to `row_dtype`,
    which gives exactly the rows of the widened table.

    `mapped`: the table is a copy-on-write mapping of the checkpoint file (lm/quantized.py, Moshi 7B: 0.6 GB of
    tables that need not be RAM); after each lookup its pages are dropped from this process (the rows stay
    in the system's file cache), so it takes no RAM of its own. Such a table is read-only.
    """

    row_dtype: torch.dtype | None = None
    mapped: int | None = None  # data_ptr of the file-mapped weight (a copy made by .to() is ordinary memory)

    def __init__(self, num_embeddings: int, dim: int, low_rank: int | None = None, demux: bool = False) -> None:
        super().__init__(num_embeddings, low_rank or dim)
        self.low_rank = nn.Linear(low_rank, dim, bias=False) if low_rank else None
        self.demux = demux
        if demux:
            self.out1 = nn.Linear(low_rank or dim, dim, bias=False)
            self.out2 = nn.Linear(low_rank or dim, dim, bias=False)

    def _apply(self, fn, recurse: bool = True):  # .to(...): the rows follow the model's new float dtype
        row_dtype = None if self.row_dtype is None else fn(torch.empty(0, dtype=self.row_dtype)).dtype
        out = super()._apply(fn, recurse)
        self.row_dtype = None if row_dtype == self.weight.dtype else row_dtype
        return out

    def _lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight)
        if self.mapped is not None and self.mapped == self.weight.data_ptr():
            drop_pages(self.weight)
        return rows if self.row_dtype is None else rows.to(self.row_dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        absent = (tokens == NO_TOKEN).unsqueeze(-1)
        tokens = tokens.clamp(min=0)
        if self.demux:
            n = self.num_embeddings
            first, second = tokens % n, tokens // n - 1
            out = fast.linear_module(self.out1, self._lookup(first))
            other = fast.linear_module(self.out2, self._lookup(second.clamp(min=0)))
            out = out + other.masked_fill((second < 0).unsqueeze(-1), 0.0)
            return out.masked_fill(absent, 0.0)
        out = self._lookup(tokens).masked_fill(absent, 0.0)
        if self.low_rank is not None:
            out = fast.linear_module(self.low_rank, out)
        return out


class LMModel(StreamingModule):
    """RQ-Transformer. `with lm.streaming(B):` streams the temporal transformer frame by frame.

    The depth transformer is detached: it streams on its own clock (one run of dep_q steps per frame).
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, ddim = cfg.dim, cfg.depformer_dim
        self.emb = nn.ModuleList([TokenEmbedding(cfg.card + 1, dim) for _ in range(cfg.n_q)])
        # Text may also take its initial token as input, hence text_card + 1 rows.
        self.text_emb = TokenEmbedding(cfg.text_card + 1, dim, demux=cfg.demux_second_text_stream)
        self.text_linear = nn.Linear(dim, cfg.text_out, bias=cfg.bias_proj)
        self.transformer = Transformer(cfg.temporal_config())
        self.out_norm = make_norm(cfg.norm, dim)
        self.depformer_in = nn.ModuleList([nn.Linear(dim, ddim, bias=False) for _ in range(cfg.depformer_in_count)])
        if cfg.dep_q > 0:
            # The last codebook is never an input of the depth transformer: dep_q - 1 tables.
            rank = cfg.depformer_low_rank_embeddings
            self.depformer_emb = nn.ModuleList([TokenEmbedding(cfg.card + 1, ddim, rank)
                                                for _ in range(cfg.dep_q - 1)])
            self.depformer_text_emb = TokenEmbedding(cfg.text_card + 1, ddim, rank, cfg.demux_second_text_stream)
            self.depformer_norms = (nn.ModuleList([make_norm(cfg.depformer_norm, ddim) for _ in range(cfg.dep_q)])
                                    if cfg.depformer_norm else None)
            self.depformer = Transformer(cfg.depth_config())
            self.depformer.set_streaming_detached(True)
        else:  # text-only models (e.g. speech-to-text) have no depth transformer
            self.depformer_emb = None
            self.depformer_text_emb = None
            self.depformer_norms = None
            self.depformer = None
        self.extra_heads = nn.ModuleList(
            [nn.Linear(dim, cfg.extra_heads_dim, bias=False) for _ in range(cfg.extra_heads_num_heads)])
        self.linears = nn.ModuleList([nn.Linear(ddim, cfg.card, bias=cfg.bias_proj) for _ in range(cfg.dep_q)])
        # conditioning (TTS): conditioners embed named conditions, the fuser says how they enter the model
        self.condition_provider = ConditionProvider(cfg.conditioners, dim) if cfg.conditioners else None
        self.fuser = ConditionFuser(cfg.fuser) if cfg.fuser else None
        if not self.text_emb.weight.is_meta:
            self.init_weights()

    def set_kv_cache(self, kind: str) -> None:
        """Store the temporal transformer's streaming keys and values as float | bf16 | int8 | int4
        (nn/kv_cache.py): int8 takes a quarter of fp32's memory (~0.26 MiB per step at 7B instead of 1 MiB),
        int4 about a seventh."""
        self.transformer.set_kv_cache(kind)

    # ---- weights
    @torch.no_grad()
    def init_weights(self) -> None:
        """Kyutai's training init: truncated normal with std 1 / sqrt(fan_in) (1 / sqrt(dim) for embeddings)."""

        def trunc(weight: torch.Tensor, fan_in: int) -> None:
            std = 1 / math.sqrt(fan_in)
            nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

        embeddings = [*self.emb, self.text_emb]
        if self.depformer_emb is not None:
            embeddings += [*self.depformer_emb, self.depformer_text_emb]
        for emb in embeddings:
            trunc(emb.weight, emb.embedding_dim)
        for linear in [self.text_linear, *self.linears]:
            trunc(linear.weight, linear.in_features)
            if linear.bias is not None:
                linear.bias.zero_()
        for layer in self.transformer.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    trunc(module.weight, module.in_features)
            trunc(layer.self_attn.out_proj.weight, self.cfg.dim)

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.row_dtype or self.text_emb.weight.dtype

    def initial_tokens(self, batch_size: int = 1) -> torch.Tensor:
        """The tokens fed before the first frame: text_card for text, card for audio -> long [B, K, 1]."""
        cfg = self.cfg
        tokens = torch.full((batch_size, cfg.num_codebooks, 1), cfg.card, dtype=torch.long, device=self.device)
        tokens[:, 0] = cfg.text_card
        return tokens

    # ---- temporal transformer
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the stream embeddings: tokens [B, K, T] (text first) -> [B, T, dim]."""
        x = self.text_emb(tokens[:, 0])
        for k, emb in enumerate(self.emb):
            x = x + emb(tokens[:, k + 1])
        return x

    def forward_text(self, tokens: torch.Tensor, sum_condition: torch.Tensor | None = None,
                     cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K, T] -> (hidden [B, T, dim] after out_norm, text logits [B, 1, T, text_card_out]).

        sum_condition [B, 1, dim] is added to every step's input; cross [B, S, dim] is the cross-attention
        source (see `fused_conditions`).
        """
        x = self.embed(tokens)
        if sum_condition is not None:
            x = x + sum_condition.to(x)
        hidden = self.out_norm(self.transformer(x, cross))
        return hidden, fast.linear_module(self.text_linear, hidden)[:, None]

    def fused_conditions(self, conditions: dict[str, Condition] | None
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sum [B, 1, dim], cross [B, S, dim]) of embedded conditions (from `condition_provider`)."""
        if self.fuser is None:
            if conditions:
                raise ValueError("this model takes no conditions")
            return None, None
        if conditions is None:
            raise ValueError(f"this model needs conditions: {', '.join(self.fuser.names())}")
        return self.fuser.sum(conditions), self.fuser.cross(conditions)

    def extra_head_probs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Softmax outputs of the extra heads for hidden [B, T, dim] -> list of [B, T, extra_heads_dim]."""
        return [F.softmax(fast.linear_module(head, hidden), dim=-1) for head in self.extra_heads]

    # ---- depth transformer
    def _depth_input(self, k: int, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Input of depth step k: projection of hidden [B, T, dim] + embedding of prev_tokens [B, T]."""
        assert self.depformer_emb is not None and self.depformer_text_emb is not None
        emb = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
        projection = fast.linear_module(self.depformer_in[self.cfg.depformer_in_index(k)], hidden)
        return projection + emb(prev_tokens)

    def _depth_head(self, k: int, out: torch.Tensor) -> torch.Tensor:
        if self.depformer_norms is not None:
            out = self.depformer_norms[k](out)
        return fast.linear_module(self.linears[k], out)

    def depth_step(self, k: int, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """One streaming step of the depth transformer (inside `depformer.streaming()`, after a reset).

        k: codebook index; hidden [B, 1, dim] the temporal output of the frame; prev_tokens [B] the text token
        (k = 0) or the audio token of codebook k - 1. Returns the logits of codebook k, [B, card].
        """
        assert self.depformer is not None
        x = self._depth_input(k, hidden, prev_tokens[:, None])
        return self._depth_head(k, self.depformer(x))[:, 0]

    def depth_logits_recompute(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Depth step without a cache (for depth transformers that cannot stream): reruns the frame so far.

        hidden [B, 1, dim]; prev_tokens [B, k + 1] the inputs of codebooks 0..k -> logits of codebook k [B, card].
        """
        assert self.depformer is not None
        k = prev_tokens.shape[1] - 1
        x = torch.cat([self._depth_input(j, hidden, prev_tokens[:, j:j + 1]) for j in range(k + 1)], dim=1)
        return self._depth_head(k, self.depformer(x)[:, -1:])[:, 0]

    def forward_depth(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth transformer: tokens [B, K, T] of the predicted positions, hidden [B, T, dim]
        -> audio logits [B, dep_q, T, card]."""
        cfg = self.cfg
        B, _, T = tokens.shape
        if cfg.dep_q == 0 or self.depformer is None:
            return hidden.new_zeros(B, 0, T, cfg.card)
        # codebook k is fed the token of stream k (text for k = 0, audio codebook k - 1 otherwise)
        x = torch.stack([self._depth_input(k, hidden, tokens[:, k]) for k in range(cfg.dep_q)], dim=2)
        out = self.depformer(x.flatten(0, 1))  # [B * T, dep_q, ddim]: one depth sequence per frame
        out = out.unflatten(0, (B, T))
        return torch.stack([self._depth_head(k, out[:, :, k]) for k in range(cfg.dep_q)], dim=1)

    # ---- training
    def forward(self, codes: torch.Tensor, conditions: dict[str, Condition] | None = None) -> LMOutput:
        """Teacher-forced logits for codes [B, 1 + n_q, T] (text first, -1 = no token), aligned with codes.

        conditions: embedded conditions (`condition_provider(...)`) for conditioned models."""
        cfg = self.cfg
        B, K, _ = codes.shape
        if K != cfg.num_codebooks:
            raise ValueError(f"codes have {K} streams, the model expects 1 + n_q = {cfg.num_codebooks}")
        initial = self.initial_tokens(B)
        delayed = torch.cat([initial, delay_codes(codes, cfg.delays, initial)], dim=2)  # [B, K, T + 1]
        hidden, text_logits = self.forward_text(delayed[:, :, :-1], *self.fused_conditions(conditions))
        audio_logits = self.forward_depth(delayed[:, :, 1:], hidden)
        audio_logits, audio_mask = undelay(audio_logits, cfg.delays[1:1 + cfg.dep_q])
        audio_mask &= codes[:, 1:1 + cfg.dep_q] != NO_TOKEN
        text_logits, text_mask = undelay(text_logits, cfg.delays[:1])
        text_mask &= codes[:, :1] != NO_TOKEN
        return LMOutput(text_logits, text_mask, audio_logits, audio_mask, hidden)
