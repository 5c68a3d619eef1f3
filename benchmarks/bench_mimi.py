"""Mimi speed on CPU: streaming encode/decode per 80 ms frame, a batch of sessions, and offline 10 s.

    python benchmarks/bench_mimi.py [--threads 2] [--frames 50] [--batch 4] [--seconds 10] [--no-reference]

Ours and Kyutai's reference (moshi==0.2.13, when importable) run side by side in one process on the same
random weights of the official configuration (codebooks drawn from its own latents, 8 codebooks), fp32. Each
streaming number is the median over `frames` frames after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from openmoshi.codec import Mimi, mimi_official

FRAME = 1920
NUM_CODEBOOKS = 8


def _fill_codebooks(model: Mimi, seed: int) -> None:
    """Codebooks drawn from the model's latents, so codes vary (tests/mimi_utils.fill_codebooks if present)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if (tests / "mimi_utils.py").is_file() and str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    try:
        from mimi_utils import fill_codebooks
    except ImportError:
        fill_codebooks = None
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(2, 1, FRAME * 10, generator=gen) * 0.1
    if fill_codebooks is not None:
        fill_codebooks(model, wav, seed=seed)
        return
    for branch in (model.quantizer.rvq_first, model.quantizer.rvq_rest):  # fallback: random unit codewords
        for level in branch.vq.layers:
            book = level._codebook
            book.embedding_sum.copy_(torch.randn(book.embedding_sum.shape, generator=gen))
            book.cluster_usage.fill_(1.0)
            book._initialized.fill_(1.0)


def build_models(seed: int = 0, reference: bool = True) -> tuple[Mimi, torch.nn.Module | None]:
    """Our official-shape Mimi with random weights, and the reference holding the same weights (or None)."""
    torch.manual_seed(seed)
    ours = Mimi(mimi_official()).eval()
    with torch.no_grad():
        _fill_codebooks(ours, seed)
    ours.set_num_codebooks(NUM_CODEBOOKS)
    ref = None
    if reference:
        try:
            from moshi.models.loaders import get_mimi
        except ImportError:
            ref = None
        else:
            ref = get_mimi(None, num_codebooks=NUM_CODEBOOKS).eval()
            ref.load_state_dict(ours.state_dict())
    return ours, ref


@torch.inference_mode()
def bench_streaming(model: torch.nn.Module, batch: int, frames: int, warmup: int,
                    seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-frame encode and decode times in ms over `frames` frames after `warmup` ones."""
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(batch, 1, FRAME * (frames + warmup), generator=gen) * 0.1
    enc, dec = [], []
    with model.streaming(batch):
        for i in range(frames + warmup):
            chunk = wav[..., i * FRAME:(i + 1) * FRAME]
            t0 = time.perf_counter()
            codes = model.encode(chunk)
            t1 = time.perf_counter()
            model.decode(codes)
            t2 = time.perf_counter()
            if i >= warmup:
                enc.append((t1 - t0) * 1e3)
                dec.append((t2 - t1) * 1e3)
    return enc, dec


@torch.inference_mode()
def bench_offline(model: torch.nn.Module, seconds: float, repeats: int = 1, seed: int = 0) -> float:
    """Best wall time in s of encode + decode of `seconds` of audio (batch 1), after one warm-up."""
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(1, 1, int(seconds * 24_000) // FRAME * FRAME, generator=gen) * 0.1
    model.decode(model.encode(wav[..., : FRAME * 4]))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.decode(model.encode(wav))
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(model: torch.nn.Module, frames: int, warmup: int, batch: int, seconds: float,
             repeats: int) -> dict[str, float]:
    enc, dec = bench_streaming(model, 1, frames, warmup)
    total = [a + b for a, b in zip(enc, dec)]
    benc, bdec = bench_streaming(model, batch, max(frames // 2, 5), warmup)
    return {
        "encode_ms": statistics.median(enc),
        "decode_ms": statistics.median(dec),
        "frame_ms": statistics.median(total),
        f"batch{batch}_frame_ms": statistics.median(a + b for a, b in zip(benc, bdec)),
        f"offline_{seconds:g}s_s": bench_offline(model, seconds, repeats),
    }


def run_mimi_bench(threads: int = 2, frames: int = 50, warmup: int = 5, batch: int = 4, seconds: float = 10.0,
                   repeats: int = 2, reference: bool = True, seed: int = 0) -> dict:
    """Runs the benchmark; returns {"ours": {...}, "reference": {...} or None, "threads": n, ...}.

    Each of "ours"/"reference" holds encode_ms, decode_ms, frame_ms (medians per 80 ms frame, batch 1),
    batch{N}_frame_ms (all N sessions) and offline_{S}s_s (seconds for S s of audio).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, ref = build_models(seed, reference)
        result = {"threads": threads, "batch": batch, "seconds": seconds, "frames": frames, "warmup": warmup,
                  "device": "cpu", "dtype": "float32", "num_codebooks": NUM_CODEBOOKS,
                  "torch": torch.__version__}
        result["ours"] = _measure(ours, frames, warmup, batch, seconds, repeats)
        result["reference"] = None if ref is None else _measure(ref, frames, warmup, batch, seconds, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    return result


def format_table(result: dict) -> str:
    ours, ref = result["ours"], result["reference"]
    batch, seconds = result["batch"], result["seconds"]
    rows = [
        ("streaming encode, ms/frame", "encode_ms"),
        ("streaming decode, ms/frame", "decode_ms"),
        ("streaming encode+decode, ms/frame", "frame_ms"),
        (f"batch {batch} encode+decode, ms/frame", f"batch{batch}_frame_ms"),
        (f"offline {seconds:g} s encode+decode, s", f"offline_{seconds:g}s_s"),
    ]
    head = (f"Mimi, CPU fp32, {result['threads']} threads, {result['num_codebooks']} codebooks, "
            "batch 1 unless noted")
    lines = [head, "", f"| {'':38} | {'openmoshi':>10} | {'reference':>10} | {'speed-up':>8} |",
             f"|{'-' * 40}|{'-' * 12}|{'-' * 12}|{'-' * 10}|"]
    for label, key in rows:
        a = ours[key]
        b = ref[key] if ref else None
        ref_txt = f"{b:10.2f}" if b is not None else f"{'n/a':>10}"
        gain = f"{b / a:7.1f}x" if b is not None else f"{'':>8}"
        lines.append(f"| {label:38} | {a:10.2f} | {ref_txt} | {gain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=50, help="streamed frames measured (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="offline audio length")
    parser.add_argument("--repeats", type=int, default=2, help="offline runs, best kept")
    parser.add_argument("--no-reference", action="store_true", help="skip Kyutai's moshi even if installed")
    args = parser.parse_args(argv)
    result = run_mimi_bench(args.threads, args.frames, args.warmup, args.batch, args.seconds, args.repeats,
                            reference=not args.no_reference)
    print(format_table(result))


if __name__ == "__main__":
    main()
