"""Peak RAM of `openmoshi train lm --init MODEL` before the first step, and the 7B LoRA's memory (meta build).

    python benchmarks/bench_lm_init_memory.py init MODEL --data MANIFEST [--mode meta|eager] [--lora-rank R]
                                               [--fsdp N]   # N torchrun processes, --parallel fsdp
    python benchmarks/bench_lm_init_memory.py bf16 MODEL OUT     # MODEL's LM weights as bf16 (as Kyutai ships)
    python benchmarks/bench_lm_init_memory.py lora7b [--rank 128]

`init` runs, in a child process, what `train lm --init` does before its first step (LMTask.setup: the LM
built on the meta device and loaded once, Mimi, tokenizer, data, optimizer) and prints its peak RSS beside
the bytes of the weights it holds (with --fsdp N: each process, its shards). `--mode eager` builds the LM with real (random) parameters first and then
copies the checkpoint in: the two-copies baseline. MODEL is a model folder, e.g. from
`openmoshi init bench MODEL` (~0.4 B parameters).

`lora7b` builds Moshi 7B on the meta device (no memory) and adds up the bytes of a LoRA fine-tune: frozen base
weights (bf16 or fp32), adapters, their gradients and AdamW moments (fp32), beside 24 GB and 80 GB cards.
Activations come on top (they depend on batch and crop; activation checkpointing keeps one layer's).
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


def _setup(model: str, data: str, mode: str, lora_rank: int) -> None:
    from openmoshi.checkpoint import load_into, read_safetensors
    from openmoshi.lm.loading import _weights_path
    from openmoshi.lm.model import LMModel
    from openmoshi.train import distributed
    from openmoshi.train.lm import task as lm_task
    from openmoshi.train.lm.config import stage_config
    from openmoshi.train.task import TrainEnv

    cfg = stage_config("finetune")
    cfg.model.init, cfg.data.data, cfg.lora.rank = model, [data], lora_rank
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
           "--lora-rank", str(args.lora_rank)]
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
    print(f"{args.mode:<6}{rank} lora {args.lora_rank}: weights held {weights:.2f} GB (LM {r['lm_gb']:.2f} + Mimi "
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
    from openmoshi.train.lm.lora import LoRAConfig, add_lora
    with torch.device("meta"):
        lm = LMModel(LMConfig.moshi_7b())
        base = sum(p.numel() for p in lm.parameters())
        adapters = sum(p.numel() for p in add_lora(lm, LoRAConfig(rank=rank)))
    state = 16 * adapters / GIB  # fp32 adapters, gradients, Adam m and v
    print(f"Moshi 7B (meta-device build): {base / 1e9:.3f} B base parameters; LoRA rank {rank} on every linear: "
          f"{adapters / 1e6:.1f} M adapter parameters = {state:.2f} GiB with gradients and AdamW moments (fp32)")
    print(f"{'frozen base':<12} {'base GiB':>9} {'total GiB':>10} {'left on 24 GiB':>15} {'left on 80 GiB':>15}")
    for name, size in (("bf16", 2), ("fp32", 4)):
        total = size * base / GIB + state
        print(f"{name:<12} {size * base / GIB:>9.1f} {total:>10.1f} {24 - total:>15.1f} {80 - total:>15.1f}")
    print("(before activations, the CUDA context and the codec; `train lm --init` keeps the base in fp32 today)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["init", "bf16", "lora7b", "_child"])
    parser.add_argument("model", nargs="?", help="model folder (init, bf16)")
    parser.add_argument("out", nargs="?", type=Path, help="bf16: output folder")
    parser.add_argument("--data", help="init: a training manifest (any small one: only set-up runs)")
    parser.add_argument("--mode", choices=["meta", "eager"], default="meta",
                        help="init: meta = as `train lm --init` does; eager = real parameters then a copy")
    parser.add_argument("--lora-rank", type=int, default=0, help="init: LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--fsdp", type=int, default=1, help="init: run N torchrun processes with --parallel fsdp")
    parser.add_argument("--rank", type=int, default=128, help="lora7b: LoRA rank")
    args = parser.parse_args()
    if args.what == "lora7b":
        lora7b(args.rank)
    elif args.what == "bf16":
        to_bf16(Path(args.model), args.out)
    elif args.what == "_child":
        _setup(args.model, args.data, args.mode, args.lora_rank)
    else:
        init(args)


if __name__ == "__main__":
    main()
