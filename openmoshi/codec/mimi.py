"""Mimi: streaming neural audio codec, 24 kHz mono <-> 12.5 Hz frames of K codes.

    wav [B, 1, T] -> SEANet encoder (25 Hz) -> transformer -> strided conv (12.5 Hz) -> split RVQ -> codes [B, K, F]
    codes [B, K, F] -> RVQ decode -> depthwise transposed conv (25 Hz) -> transformer -> SEANet decoder -> wav

Every stage is causal and streams: inside `with mimi.streaming(batch_size):` each `encode` call takes any
multiple of `frame_size` samples and each `decode` call any number of frames, and the concatenated outputs
equal one offline pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import fast
from ..nn.conv import StreamingConv1d, StreamingConvTranspose1d
from ..nn.streaming import StreamingModule
from ..nn.transformer import Transformer
from .config import MimiConfig
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetDecoder, SeanetEncoder


def _forget_weight_copies(module: nn.Module, incompatible_keys: object) -> None:
    fast.clear_cache()


class LatentTransformer(nn.Module):
    """Transformer on conv-layout latents [B, C, T] (keys `*.transformer.layers.N...`)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.transformer = Transformer(cfg.transformer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(x.transpose(1, 2)).transpose(1, 2)


class _Downsample(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = StreamingConv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        # Depthwise (groups = dim), as in the released weights.
        self.convtr = StreamingConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


class Mimi(StreamingModule):
    def __init__(self, cfg: MimiConfig | None = None, num_codebooks: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MimiConfig()
        if cfg.channels != 1:
            raise ValueError("only mono Mimi models are supported")
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.encoder_transformer = LatentTransformer(cfg)
        self.decoder_transformer = LatentTransformer(cfg)
        self.quantizer = SplitResidualVectorQuantizer(cfg.quantizer)
        self.downsample = _Downsample(cfg.seanet.dimension, cfg.downsample_stride)
        self.upsample = _Upsample(cfg.seanet.dimension, cfg.downsample_stride)
        if num_codebooks is not None:
            self.set_num_codebooks(num_codebooks)
        # Loading copies into the weights in place; weights made under inference_mode carry no version
        # counter, so drop the fast paths' weight copies explicitly.
        self.register_load_state_dict_post_hook(_forget_weight_copies)

    # ---- public properties
    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def num_codebooks(self) -> int:
        return self.quantizer.num_codebooks

    @property
    def total_codebooks(self) -> int:
        return self.quantizer.total_codebooks

    @property
    def cardinality(self) -> int:
        return self.quantizer.cardinality

    def set_num_codebooks(self, n: int) -> None:
        """Use the first `n` levels (1 semantic + n - 1 acoustic); 1 <= n <= total_codebooks."""
        if not 1 <= n <= self.total_codebooks:
            raise ValueError(f"num_codebooks must be in 1..{self.total_codebooks}, got {n}")
        self.quantizer.set_num_codebooks(n)

    # ---- encoding
    def encode_to_latent(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, T] -> unquantized latent [B, D, ceil(T / frame_size)] at the frame rate."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"Mimi.encode expects mono audio shaped [B, 1, T], got {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"Mimi.encode expects float audio, got {wav.dtype}")
        length = wav.shape[-1]
        if self.is_streaming:
            if length == 0 or length % self.frame_size:
                raise ValueError(f"streaming encode needs a positive multiple of {self.frame_size} samples "
                                 f"per call, got {length}; buffer the audio before calling encode")
        elif length % self.frame_size:
            wav = F.pad(wav, (0, self.frame_size - length % self.frame_size))
        with fast.packing():  # Mimi's weights are small enough to keep a packed copy (see nn/fast.py)
            latent = self.encoder(wav)
            latent = self.encoder_transformer(latent)
            return self.downsample(latent)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav float [B, 1, T] at `sample_rate` -> codes long [B, K, T / frame_size] (T padded up offline)."""
        latent = self.encode_to_latent(wav)
        with fast.packing():
            return self.quantizer.encode(latent)

    # ---- decoding
    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] -> quantized latent [B, D, F]."""
        if codes.dim() != 3:
            raise ValueError(f"Mimi.decode expects codes shaped [B, K, F], got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"Mimi.decode expects integer codes, got {codes.dtype}")
        if codes.shape[1] > self.total_codebooks:
            raise ValueError(f"got {codes.shape[1]} codebooks, this Mimi has {self.total_codebooks}")
        return self.quantizer.decode(codes.long())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes long [B, K, F] -> wav float [B, 1, F * frame_size]."""
        latent = self.upsample(self.decode_latent(codes))
        with fast.packing():
            latent = self.decoder_transformer(latent)
            return self.decoder(latent)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Offline reconstruction wav [B, 1, T] -> [B, 1, T] through the codes."""
        return self.decode(self.encode(wav))[..., : wav.shape[-1]]
