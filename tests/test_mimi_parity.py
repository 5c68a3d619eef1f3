"""Mimi against Kyutai's reference (moshi==0.2.13) on the same random weights of the official configuration."""

from __future__ import annotations

import pytest
import torch

from mimi_utils import fill_codebooks
from openmoshi.codec import Mimi, load_mimi, mimi_official, save_mimi

moshi_loaders = pytest.importorskip("moshi.models.loaders")


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, speech_batch) -> str:
    """Random official-shape Mimi, codebooks drawn from real speech latents, saved in Kyutai's layout."""
    torch.manual_seed(1234)
    mimi = Mimi(mimi_official()).eval()
    fill_codebooks(mimi, speech_batch)
    return str(save_mimi(mimi, tmp_path_factory.mktemp("mimi") / "mimi.safetensors"))


def _stream_encode(model, wav: torch.Tensor, frames_per_call: list[int]) -> torch.Tensor:
    out, start, i = [], 0, 0
    with model.streaming(wav.shape[0]):
        while start < wav.shape[-1]:
            step = frames_per_call[i % len(frames_per_call)] * 1920
            out.append(model.encode(wav[..., start:start + step]))
            start, i = start + step, i + 1
    return torch.cat(out, dim=-1)


def _stream_decode(model, codes: torch.Tensor, frames_per_call: list[int]) -> torch.Tensor:
    out, start, i = [], 0, 0
    with model.streaming(codes.shape[0]):
        while start < codes.shape[-1]:
            step = frames_per_call[i % len(frames_per_call)]
            out.append(model.decode(codes[..., start:start + step]))
            start, i = start + step, i + 1
    return torch.cat(out, dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("num_codebooks", [8, 32])
@torch.inference_mode()
def test_same_codes_and_audio_as_reference(official_file, speech_batch, num_codebooks):
    ours = load_mimi(official_file, num_codebooks=num_codebooks)
    ref = moshi_loaders.get_mimi(official_file, num_codebooks=num_codebooks)
    wav = speech_batch[..., : 1920 * 30]  # 2.4 s, batch of two speakers

    codes_ref = ref.encode(wav)
    codes = ours.encode(wav)
    assert codes.shape == (2, num_codebooks, 30)
    assert torch.equal(codes, codes_ref)
    # Codes must carry information: many distinct values per level, differences between the speakers.
    assert all(len(torch.unique(codes[:, k])) > 5 for k in range(num_codebooks))
    assert not torch.equal(codes[0], codes[1])

    audio_ref = ref.decode(codes_ref)
    audio = ours.decode(codes)
    assert audio.shape == (2, 1, 30 * 1920)
    assert (audio - audio_ref).abs().max() < 1e-4

    # Streaming, chunk by chunk: uneven chunk sizes for us, one frame at a time for the reference.
    assert torch.equal(_stream_encode(ours, wav, [1, 3, 2]), codes_ref)
    assert torch.equal(_stream_encode(ref, wav, [1]), codes_ref)
    streamed_audio = _stream_decode(ours, codes, [2, 1, 4])
    assert (streamed_audio - _stream_decode(ref, codes, [1])).abs().max() < 1e-4
    assert (streamed_audio - audio_ref).abs().max() < 1e-4


@pytest.mark.slow
@torch.inference_mode()
def test_offline_encode_pads_partial_frame_like_reference(official_file, speech_batch):
    ours = load_mimi(official_file)
    ref = moshi_loaders.get_mimi(official_file)
    wav = speech_batch[..., : 1920 * 5 + 700]
    codes = ours.encode(wav)
    assert codes.shape[-1] == 6
    assert torch.equal(codes, ref.encode(wav))
