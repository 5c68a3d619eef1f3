"""Peak RAM of `openmoshi train lm --init MODEL` before the first step, and the 7B LoRA's memory (meta build).

    python benchmarks/bench_lm_init_memory.py init MODEL --data MANIFEST [--mode meta|eager] [--lora-rank R]
                                               [--fsdp N]   # N torchrun processes, --parallel fsdp
    python benchmarks/bench_lm_init_memory.py bf16 MODEL OUT     # MODEL's LM weights as bf16 (as Kyutai ships)
    python benchmarks/bench_lm_init_memory.py lora7b [--rank 128]
    python benchmarks/bench_lm_init_memory.py train MODEL --data MANIFEST --lora-rank R --base-dtype bf16|fp32

`init` runs, in a child process, what `train lm --init` does before its first step (LMTask.setup: the LM
built on the meta device and loaded once, Mimi, tokenizer, data, optimizer) and prints its peak RSS beside
the bytes of the weights it holds (with --fsdp N: each process, its shards). `--mode eager` builds the LM with real (random) parameters first and then
copies the checkpoint in: the two-copies baseline. MODEL is a model folder, e.g. from
`openmoshi init bench MODEL` (~0.4 B parameters).

`lora7b` builds Moshi 7B on the meta device (no memory) and adds up the bytes of a LoRA fine-tune: frozen base
weights (bf16 or fp32), adapters, their gradients and AdamW moments (fp32), beside 24 GB and 80 GB cards.
Activations come on top (they depend on batch and crop; activation checkpointing keeps one layer's).

`train` runs `openmoshi train lm` LoRA fine-tuning for a few steps (batch 1) and prints the child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout, not another installed one
GB, GIB = 1e9, 2**30


def _status() -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process in GB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024 / GB
    return out


def _setup(model: str, data: str, mode: str, lora_rank: int, base_dtype: str) -> None:
    from openmoshi.checkpoint import load_into, read_safetensors
    from openmoshi.lm.loading import _weights_path
    from openmoshi.lm.model import LMModel
    from openmoshi.train import distributed
    from openmoshi.train.lm import task as lm_task
    from openmoshi.train.lm.config import stage_config
    from openmoshi.train.task import TrainEnv

    cfg = stage_config("finetune")
    cfg.model.init, cfg.data.data, cfg.lora.rank = model, [data], lora_rank
    cfg.lora.base_dtype = base_dtype if lora_rank else "auto"
    cfg.train.parallel = "fsdp"  # with one process: nothing to shard
    info = distributed.init("cpu")
    if mode == "eager":  # the baseline: real parameters first, then the checkpoint copied into them

        def eager_load(source, device="cpu", dtype=torch.float32):
            lm_cfg, _ = lm_task.read_config(source)
            lm = LMModel(lm_cfg).to(dtype)
            weights = _weights_path(source, lm_cfg)
            load_into(lm, read_safetensors(weights), weights, dtype=dtype)
            return lm.eval()

        lm_task.load_lm = eager_load
    base = _status()
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:  # the kernel keeps the peak of the whole RSS only: sample the private part
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    task = lm_task.LMTask(cfg)
    task.setup(TrainEnv(cfg.train, torch.device("cpu"), info, Path("/nonexistent")))
    done.set()
    sampler.join()
    lm_bytes = sum(getattr(t, "_local_tensor", t).nbytes for t in task.lm.state_dict().values())  # shards
    mimi_bytes = sum(t.nbytes for t in task.mimi.state_dict().values())
    print("REPORT " + json.dumps({"rank": info.rank, "mode": mode, "lora_rank": lora_rank, "before": base, "after": _status(),
                                  "peak_anon": peak_anon[0],
                                  "lm_gb": lm_bytes / GB, "mimi_gb": mimi_bytes / GB}), flush=True)
    distributed.shutdown()


def init(args: argparse.Namespace) -> None:
    run = [sys.executable] if args.fsdp <= 1 else ["torchrun", "--nproc-per-node", str(args.fsdp), "--master-port",
                                                     "29650"]
    cmd = [*run, __file__, "_child", args.model, "--data", args.data, "--mode", args.mode,
           "--lora-rank", str(args.lora_rank), "--base-dtype", args.base_dtype]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode or not lines:
        sys.exit(f"child failed: {proc.stderr[-2000:]}")
    for line in sorted(lines):
        _print(json.loads(line[len("REPORT "):]), args)


def _print(r: dict, args: argparse.Namespace) -> None:
    weights = r["lm_gb"] + r["mimi_gb"]
    a = r["after"]
    rank = f" rank {r['rank']}/{args.fsdp}" if args.fsdp > 1 else ""
    base = f" ({args.base_dtype} base)" if args.lora_rank else ""
    print(f"{args.mode:<6}{rank} lora {args.lora_rank}{base}: weights held {weights:.2f} GB (LM {r['lm_gb']:.2f} + Mimi "
          f"{r['mimi_gb']:.2f}); python+torch at start {r['before']['VmRSS']:.2f} GB; peak RSS {a['VmHWM']:.2f} GB "
          f"= start + {(a['VmHWM'] - r['before']['VmRSS']) / weights:.2f} x weights (anonymous peak "
          f"{r['peak_anon']:.2f} GB); after setup RSS "
          f"{a['VmRSS']:.2f} GB (anonymous {a['RssAnon']:.2f}, file-backed {a['RssFile']:.2f})")


def to_bf16(model: Path, out: Path) -> None:
    from openmoshi.checkpoint import read_safetensors, save_safetensors
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    state = read_safetensors(model / "model.safetensors")
    save_safetensors({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
                     out / "model.safetensors")


def lora7b(rank: int) -> None:
    from openmoshi.lm.config import LMConfig
    from openmoshi.lm.model import LMModel
    from openmoshi.train.lm.lora import LoRAConfig, add_lora, hold_frozen_base
    rows = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with torch.device("meta"):  # what `train lm` holds: add_lora, then hold_frozen_base
            lm = LMModel(LMConfig.moshi_7b())
            base = sum(p.numel() for p in lm.parameters())
            adapters = sum(p.numel() for p in add_lora(lm, LoRAConfig(rank=rank)))
            hold_frozen_base(lm, dtype)
        frozen = sum(p.nbytes for p in lm.parameters() if not p.requires_grad) / GIB
        narrow = sum(p.numel() for p in lm.parameters() if p.dtype == torch.bfloat16)
        largest = max(p.numel() for n, p in lm.named_parameters() if n.endswith(".original"))
        rows.append((name, frozen, narrow))
    state = 16 * adapters / GIB  # fp32 adapters, gradients, Adam m and v
    print(f"Moshi 7B (meta-device build): {base / 1e9:.3f} B base parameters; LoRA rank {rank} on every linear: "
          f"{adapters / 1e6:.1f} M adapter parameters = {state:.2f} GiB with gradients and AdamW moments (fp32)")
    print(f"{'frozen base':<12} {'in bf16':>8} {'base GiB':>9} {'total GiB':>10} {'left on 24 GiB':>15} "
          f"{'left on 80 GiB':>15}")
    for name, frozen, narrow in rows:
        total = frozen + state
        print(f"{name:<12} {narrow / 1e9:>7.3f}B {frozen:>9.1f} {total:>10.1f} {24 - total:>15.1f} {80 - total:>15.1f}")
    merged = 2 * base / GIB
    print(f"(before activations, the CUDA context and the codec. Each LoRA weight is used merged, W + s B A; "
          f"without activation checkpointing the graph keeps every layer's merged copy until backward: "
          f"~{merged:.1f} GiB in bf16 under autocast; with it, one layer's (largest weight "
          f"{largest / 1e6:.0f} M = {4 * largest / GIB:.2f} GiB in fp32))")


def train(args: argparse.Namespace) -> None:
    """`openmoshi train lm` LoRA fine-tuning for a few steps in a child process: its peak RSS and step time."""
    import tempfile
    import time
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "openmoshi", "train", "lm", "--stage", "finetune", "--init", args.model,
               "--data", args.data, "--out", out, "--lora-rank", str(args.lora_rank), "--lora-base-dtype",
               args.base_dtype, "--max-steps", str(args.steps), "--batch-size", "1", "--duration",
               str(args.duration), "--eval-every", "0", "--checkpoint-every", "1000", "--threads", str(args.threads),
               "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.plots=false",
               "--set", "train.log_every=1"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _, rc, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if rc:
            sys.exit(f"train failed: {proc.stderr.read()[-2000:]}")
        steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in steps if m.get("split") == "train"]
    step_s = [round(m["step_s"], 1) for m in steps if "step_s" in m]
    print(f"LoRA rank {args.lora_rank}, frozen base {args.base_dtype}: peak RSS {usage.ru_maxrss * 1024 / GB:.2f} GB; "
          f"{args.steps} steps of batch 1 x {args.duration:g} s, whole run {wall:.1f} s; losses "
          f"{[round(m['loss'], 4) for m in steps]}" + (f"; step s {step_s}" if step_s else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["init", "bf16", "lora7b", "train", "_child"])
    parser.add_argument("model", nargs="?", help="model folder (init, bf16)")
    parser.add_argument("out", nargs="?", type=Path, help="bf16: output folder")
    parser.add_argument("--data", help="init: a training manifest (any small one: only set-up runs)")
    parser.add_argument("--mode", choices=["meta", "eager"], default="meta",
                        help="init: meta = as `train lm --init` does; eager = real parameters then a copy")
    parser.add_argument("--lora-rank", type=int, default=0, help="init: LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--fsdp", type=int, default=1, help="init: run N torchrun processes with --parallel fsdp")
    parser.add_argument("--rank", type=int, default=128, help="lora7b: LoRA rank")
    parser.add_argument("--base-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="init, train: LoRA's frozen base dtype")
    parser.add_argument("--steps", type=int, default=2, help="train: optimizer steps")
    parser.add_argument("--duration", type=float, default=4.0, help="train: seconds per item")
    parser.add_argument("--threads", type=int, default=2, help="train: CPU threads")
    args = parser.parse_args()
    if args.what == "lora7b":
        lora7b(args.rank)
    elif args.what == "train":
        train(args)
    elif args.what == "bf16":
        to_bf16(Path(args.model), args.out)
    elif args.what == "_child":
        _setup(args.model, args.data, args.mode, args.lora_rank, args.base_dtype)
    else:
        init(args)


if __name__ == "__main__":
    main()
