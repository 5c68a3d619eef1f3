"""Codec training speed on CPU (or GPU): audio seconds trained per second, peak memory, and the codec's
forward + backward (no discriminator) beside Kyutai's reference MimiModel on the same batch.

    python benchmarks/bench_train_codec.py [--threads 2] [--steps 3] [--shapes tiny,mimi] [--batch 2]
        [--seconds 1.0] [--no-reference] [--device cpu]

Training rows run the real step of `openmoshi train codec` (openmoshi.train.codec.CodecTask: codec with
weight norm, MS-STFT discriminator, adversarial + feature-matching losses through the balancer, both
optimizers) on real speech crops; each is the median of `steps` steps after one warm-up step (k-means
initialisation). The forward+backward rows use the official shapes with plain convs (as the reference has),
all 32 levels, and the same weights and batch for both; the loss is the output sum plus the commitment penalty.
Beside each time: the minor page faults per step (fresh pages the kernel had to map and zero; on CPU a large
part of the difference between the two, see benchmarks/README.md). `--shapes ""` skips the training rows.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO.parent / "shared" / "data" / "speech"


def _speech_dir(tmp: Path) -> Path:
    files = sorted(SPEECH.glob("utt*.wav"))
    if files:
        return SPEECH
    import numpy as np
    import soundfile as sf
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(tmp / f"noise{i}.wav", (rng.standard_normal(48_000) * 0.1).astype("float32"), 24_000)
    return tmp


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_training(shapes: str, batch: int, seconds: float, steps: int, device: torch.device) -> dict:
    from openmoshi.train.codec.config import PRESETS
    from openmoshi.train.codec.task import CodecTask
    from openmoshi.train.distributed import DistInfo
    from openmoshi.train.loop import Trainer
    from openmoshi.train.task import TrainEnv
    from openmoshi.data.order import ItemRequest

    cfg = PRESETS[shapes]()
    with tempfile.TemporaryDirectory() as tmp:
        cfg.data.paths = [str(_speech_dir(Path(tmp)))]
        cfg.data.segment_seconds = seconds
        cfg.train.batch_size = batch
        task = CodecTask(cfg, Path(tmp))
        env = TrainEnv(cfg.train, device, DistInfo(), Path(tmp))
        torch.manual_seed(0)
        task.setup(env)
        trainer = Trainer(task, cfg.train, Path(tmp), cfg)
        collate = task.collate()
        times = []
        for step in range(steps + 1):
            batch_items = collate([task.dataset()[ItemRequest(i % len(task.dataset()), step * batch + i)]
                                   for i in range(batch)])
            env.step = step
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with env.autocast():
                task.train_step(batch_items, env)
            trainer._optimizer_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[1:])
        params = sum(p.numel() for p in task.codec.parameters()) / 1e6
        return {"shapes": shapes, "params_m": params, "step_s": step_s,
                "audio_s_per_s": batch * task.throughput_unit[1] / step_s, "peak_mb": _peak_mb(device)}


def bench_forward_backward(batch: int, seconds: float, reps: int, device: torch.device,
                           reference: bool) -> dict:
    from openmoshi.codec import Mimi, mimi_official
    from openmoshi.train.codec.model import TrainableMimi, export_mimi

    torch.manual_seed(0)
    ours = Mimi(mimi_official())
    sys.path.insert(0, str(REPO / "tests"))
    from mimi_utils import fill_codebooks
    wav = torch.randn(batch, 1, int(seconds * 12.5) * 1920, generator=torch.Generator().manual_seed(1)) * 0.1
    fill_codebooks(ours, wav[:, :, :19_200])
    ref = None
    if reference:
        try:
            from moshi.models import loaders
        except ImportError:
            print("reference moshi is not installed: ours only")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = export_mimi(ours, Path(tmp), ours.cfg)
                ref = loaders.get_mimi(path, num_codebooks=32, device=device).train()
    model = TrainableMimi(ours).to(device).train()
    wav = wav.to(device)
    n_rest = ours.total_codebooks - 1

    def run_ours():
        y, q, _ = model(wav, None, n_rest)
        (y.sum() + q.penalty).backward()

    def run_ref():
        q = ref(wav)
        (q.x.sum() + q.penalty).backward()

    out = {}
    fns = [("openmoshi", run_ours)] + ([("reference", run_ref)] if ref is not None else [])
    timings = {name: [] for name, _ in fns}
    faults = {name: [] for name, _ in fns}
    for rep in range(reps + 1):
        for name, fn in fns:  # interleaved, so both see the same machine load
            if device.type == "cuda":
                torch.cuda.synchronize()
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                timings[name].append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
    for name, values in timings.items():
        out[name] = (statistics.median(values), statistics.median(faults[name]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shapes", default="tiny,mimi", help='training rows to run ("" for none)')
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--fb-seconds", type=float, default=2.0, help="crop length of the forward+backward rows")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape_list = [name.strip() for name in args.shapes.split(",") if name.strip()]
    from openmoshi.train.codec.config import PRESETS

    unknown = [name for name in shape_list if name not in PRESETS]
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(unknown)} (choose from {', '.join(PRESETS)}, or \"\" for none)")
    if shape_list:
        print(f"| training step, {args.batch} x {args.seconds} s | params | step | audio s / s | peak memory |")
        print("| --- | ---: | ---: | ---: | ---: |")
    for shapes in shape_list:
        r = bench_training(shapes, args.batch, args.seconds, args.steps, device)
        print(f"| {shapes} | {r['params_m']:.1f} M | {r['step_s']:.2f} s | {r['audio_s_per_s']:.2f} | "
              f"{r['peak_mb']:.0f} MB |", flush=True)
    fb = bench_forward_backward(args.batch, args.fb_seconds, args.steps, device, not args.no_reference)
    print(f"\n| codec forward + backward, official shapes, {args.batch} x {args.fb_seconds} s | time "
          "| page faults / step |")
    print("| --- | ---: | ---: |")
    for name, (seconds, faults) in fb.items():
        print(f"| {name} | {seconds:.2f} s | {faults:,.0f} |")
    if "reference" in fb:
        print(f"| ratio openmoshi / reference | {fb['openmoshi'][0] / fb['reference'][0]:.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
