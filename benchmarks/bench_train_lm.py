"""LM training throughput: openmoshi's forward + loss + backward beside Kyutai's reference LMModel's, on the same
weights, batch and loss, in the same run; peak memory (the 7B LoRA's memory: bench_lm_init_memory.py lora7b).

  PYTHONPATH=. python benchmarks/bench_train_lm.py [--configs tiny bench] [--batch 2] [--seconds 4] [--threads 2]

Each side runs in its own subprocess so its peak memory (RSS on CPU, allocated on CUDA) is its own.
Target: ours <= 0.7x the reference's time per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _config(name: str):
    from openmoshi.lm.config import PRESETS
    return PRESETS[name]()


def _measure(side: str, config: str, batch: int, frames: int, steps: int, device: str) -> dict:
    from openmoshi.lm.model import LMModel, LMOutput
    from openmoshi.train.lm.loss import LMLossConfig, lm_loss

    torch.manual_seed(0)
    cfg = _config(config)
    ours = LMModel(cfg)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.card, (batch, cfg.num_codebooks, frames), generator=gen)
    codes[:, 0] = torch.randint(0, min(cfg.text_card, 1000), (batch, frames), generator=gen)
    codes = codes.to(device)
    pads = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)
    if side == "ours":
        model = ours.to(device).train()

        def step() -> float:
            loss, _ = lm_loss(model(codes), codes, LMLossConfig(), pads)
            loss.backward()
            return loss.item()
    else:
        from moshi.models.lm import LMModel as RefLM
        sys.path.insert(0, str(REPO / "tests"))
        from lm_utils import kyutai_kwargs
        model = RefLM(**kyutai_kwargs(cfg), device=device, dtype=torch.float32)
        model.load_state_dict(ours.state_dict())
        model.train()

        def step() -> float:
            out = model(codes)
            wrapped = LMOutput(out.text_logits, out.text_mask, out.logits, out.mask)
            loss, _ = lm_loss(wrapped, codes, LMLossConfig(), pads)
            loss.backward()
            return loss.item()

    loss = step()  # warm-up
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    best = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"side": side, "config": config, "step_s": best, "frames_per_s": batch * frames / best,
            "peak_mb": peak, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="audio seconds per item (12.5 frames each)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frames = round(args.seconds * 12.5)
    if args.worker:
        print(json.dumps(_measure(args.worker[0], args.worker[1], args.batch, frames, args.steps, args.device)))
        return
    print(f"device {args.device}, {args.threads} threads, batch {args.batch} x {frames} frames, "
          f"median of {args.steps} steps (forward + loss + backward)")
    print(f"{'config':<8} {'side':<10} {'step s':>8} {'frames/s':>9} {'peak MB':>9} {'ours/ref':>9}")
    for config in args.configs:
        results = {}
        for side in ("ours", "reference"):
            cmd = [sys.executable, __file__, "--worker", side, config, "--batch", str(args.batch), "--seconds",
                   str(args.seconds), "--steps", str(args.steps), "--threads", str(args.threads), "--device",
                   args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={"PYTHONPATH": str(REPO),
                                                                           "PATH": "/usr/bin:/bin"})
            if proc.returncode:
                print(f"{config:<8} {side:<10} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        for side, r in results.items():
            ratio = ""
            if side == "ours" and "reference" in results:
                ratio = f"{r['step_s'] / results['reference']['step_s']:.2f}x"
            print(f"{config:<8} {side:<10} {r['step_s']:>8.3f} {r['frames_per_s']:>9.1f} {r['peak_mb']:>9.0f} "
                  f"{ratio:>9}")
        if len(results) == 2:
            assert abs(results["ours"]["loss"] - results["reference"]["loss"]) < 1e-3 * results["reference"]["loss"], \
                "the two sides computed different losses"


if __name__ == "__main__":
    main()
