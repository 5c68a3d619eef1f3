"""Experiment (not in the runtime): int8 weight-only Mimi convolutions, quality and speed against fp32 convs.

    python benchmarks/bench_mimi_conv_int8.py trained|random [FRAMES]

Every conv / transposed-conv matmul that takes the streaming fast path (nn/fast.py: im2col or col2im around
one matmul over a few rows; the long inputs of the first encoder layers keep F.conv1d) runs instead through
torch's `_weight_int8pack_mm` on an int8 copy of its weight (one scale per output row, bf16 activations), by
patching `fast.rows_times_weight`. Both arms have int8 transformers (as a quantized bundle runs Mimi).
`trained`: the tiny codec of /work/runs/codec-long/model; `random`: the official shape, random weights.
Quality on the first FRAMES frames of each ../shared/data/speech/*.wav (streamed encode, frame by frame):
share of equal codes, log-mel L1 between the audio decoded from the fp32 codes by int8 and fp32 convs, and
each arm's end-to-end log-mel L1 against the input. Speed: streaming encode + decode of one frame, frames
alternating between the arms (median of 20 after 5 of warm-up).
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import json

import soundfile
from bench_quant import log_mel

from openmoshi.bundle import quantize_mimi_
from openmoshi.codec.config import MimiConfig
from openmoshi.codec.loading import load_mimi
from openmoshi.nn import fast
from openmoshi.nn.quant import int8_scale, quantize_int8

torch.set_num_threads(2)
SPEECH_DIR = Path("/work/shared/data/speech")
FRAMES = int(sys.argv[2]) if len(sys.argv) > 2 else 30
_orig = fast.rows_times_weight
USE_INT8 = {"on": False}
_q = {}

def patched(rows, weight, source=None, kind="packed"):
    if USE_INT8["on"] and source is not None and source.dim() == 3:
        key = (id(source), kind)
        if key not in _q:
            q, scb = quantize_int8(weight.detach())
            _q[key] = (q.contiguous(), int8_scale(scb).to(torch.bfloat16).contiguous())
        q, s = _q[key]
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), q, s).float()
    return _orig(rows, weight, source, kind)
fast.rows_times_weight = patched

def speech():
    wavs = []
    for p in sorted(SPEECH_DIR.glob("*.wav")):
        d, sr = soundfile.read(str(p), dtype="float32")
        w = torch.from_numpy(d if d.ndim == 1 else d.mean(1))
        if sr != 24000:
            w = torch.nn.functional.interpolate(w[None, None], scale_factor=24000 / sr, mode="linear")[0, 0]
        wavs.append(w[: 1920 * FRAMES][None, None])
    return wavs

@torch.inference_mode()
def stream(model, wav, int8):
    USE_INT8["on"] = int8
    with fast.packing(), model.streaming(1):
        codes = torch.cat([model.encode(c) for c in wav.split(1920, dim=-1)], dim=-1)
    return codes

@torch.inference_mode()
def decode(model, codes, int8):
    USE_INT8["on"] = int8
    with fast.packing(), model.streaming(1):
        return torch.cat([model.decode(codes[..., i:i + 1]) for i in range(codes.shape[-1])], dim=-1)

def evaluate(name, model):
    rows = []
    for wav in speech():
        c32, c8 = stream(model, wav, False), stream(model, wav, True)
        a32, a8 = decode(model, c32, False), decode(model, c32, True)
        a88 = decode(model, c8, True)
        rows.append(((c8 == c32).float().mean().item(), (c8[:, 0] == c32[:, 0]).float().mean().item(),
                     (log_mel(a8) - log_mel(a32)).abs().mean().item(),
                     (log_mel(a88) - log_mel(wav[..., :a88.shape[-1]])).abs().mean().item(),
                     (log_mel(a32) - log_mel(wav[..., :a32.shape[-1]])).abs().mean().item()))
        print(f"  {name}: codes equal {rows[-1][0]:.3f} (first codebook {rows[-1][1]:.3f}); log-mel L1 "
              f"int8 vs "
              f"fp32 convs decoding the fp32 codes {rows[-1][2]:.4f}; end to end vs the input: int8 convs "
              f"{rows[-1][3]:.3f}, fp32 convs {rows[-1][4]:.3f}", flush=True)
    mean = [statistics.mean(col) for col in zip(*rows)]
    print(f"  {name}, mean of {len(rows)}: codes equal {mean[0]:.3f} (first {mean[1]:.3f}); decode L1 "
          f"{mean[2]:.4f}; end to end int8 {mean[3]:.3f} / fp32 {mean[4]:.3f}", flush=True)
    # speed: alternate frame by frame, encode + decode of one frame
    noise = torch.randn(1, 1, 1920 * 25, generator=torch.Generator().manual_seed(0)) * 0.1
    times = {False: [], True: []}
    clones = {False: model, True: copy.deepcopy(model)}
    with torch.inference_mode(), fast.packing(), clones[False].streaming(1), clones[True].streaming(1):
        for i in range(25):
            for k in (False, True):
                USE_INT8["on"] = k
                t = time.perf_counter()
                clones[k].decode(clones[k].encode(noise[..., i * 1920:(i + 1) * 1920]))
                if i >= 5:
                    times[k].append((time.perf_counter() - t) * 1000)
    print(f"  {name}: frame encode + decode, median: fp32 convs {statistics.median(times[False]):.1f} ms, "
          f"int8 convs {statistics.median(times[True]):.1f} ms", flush=True)

which = sys.argv[1]
if which == "trained":
    folder = Path("/work/runs/codec-long/model")
    cfg = MimiConfig.from_kyutai(json.loads((folder / "mimi_config.json").read_text()))
    m = load_mimi(folder / "tokenizer-e351c8d8-checkpoint125.safetensors", config=cfg).eval()
else:
    from bench_mimi import build_models
    m, _ = build_models(reference=False)
quantize_mimi_(m)  # transformers int8 in both arms (as a quantized bundle runs)
evaluate(which, m)
