"""Moshi 7B int4 on this CPU: peak RAM of quantizing, of loading and stepping, and the step time.

    python benchmarks/bench_7b_memory.py write DIR       # DIR/bf16: random weights of the moshiko structure
    python benchmarks/bench_7b_memory.py quantize DIR    # `openmoshi quantize DIR/bf16 DIR/int4 --bits 4`
    python benchmarks/bench_7b_memory.py run DIR [--steps 20] [--threads 2] [--dtype float32|bfloat16]
                                              [--kv-cache float|bf16|int8|int4] [--full-steps N]
    python benchmarks/bench_7b_memory.py zeros-ab DIR [--steps 20]   # symmetric int4: zeros per call vs held

`--int4-scheme asymmetric` (quantize, run): the 5-bit format (a scale and a zero per group) in DIR/int4-asym
instead of the default symmetric one (one scale per group, 4.5 bits) in DIR/int4.

`write` streams a bf16 checkpoint (~15.4 GB: the LM of configs/moshi_7b_202409.json, random normal weights,
norms at 1) tensor by tensor, so it never holds the model; Mimi at its official shape (random, fp32) and the
bundled tiny tokenizer complete the folder. It is for measurement only: never commit it.

`quantize` and `run` each start the command in a subprocess and print its peak RSS (ru_maxrss of that child:
anonymous memory and resident pages of mapped files alike). `run` loads DIR/int4 the way `infer` and `serve`
do (load_model: Mimi, tokenizer, LM) and times `Generator.step` (one 80 ms frame, batch 1); the worker prints
its RSS after each stage, then writes every slot of the temporal transformer's KV caches (as a conversation
does by the 3000th step: they take RAM as they fill) and prints the RSS of that full context; `--full-steps N`
then sets the positions as after 3000 steps and times N steps that attend to the whole context.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout, not another installed one


def rss_mb() -> tuple[float, float, float]:
    """(current RSS, peak RSS, current RSS of file-backed pages: library code, mapped tables) of this process
    in MiB (from /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"], fields["RssFile"]


def write(folder: Path, seed: int = 0) -> None:
    from openmoshi.bundle import ASSETS
    from openmoshi.checkpoint import write_safetensors
    from openmoshi.codec.config import mimi_official
    from openmoshi.codec.loading import save_mimi
    from openmoshi.codec.mimi import Mimi
    from openmoshi.lm.config import LMConfig
    from openmoshi.lm.loading import CONFIG_NAME
    from openmoshi.lm.model import LMModel
    from openmoshi.lm.quantized import _to_file_key

    out = folder / "bf16"
    out.mkdir(parents=True, exist_ok=True)
    cfg = LMConfig.moshi_7b().replace(tokenizer_name="tokenizer_tiny.model", moshi_name="model.safetensors")
    with torch.device("meta"):
        lm = LMModel(cfg)
    shapes = {_to_file_key(k): tuple(v.shape) for k, v in lm.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)

    def tensor(key: str) -> torch.Tensor:
        shape = shapes[key]
        if key.endswith(".alpha"):
            return torch.ones(shape, dtype=torch.bfloat16)
        std = 1.0 if "emb" in key else 0.02
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    start = time.perf_counter()
    write_safetensors(out / cfg.moshi_name, {k: (torch.bfloat16, s) for k, s in shapes.items()}, tensor)
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_kyutai(), indent=2) + "\n")
    torch.manual_seed(seed)
    save_mimi(Mimi(mimi_official()).eval(), out / cfg.mimi_name)
    (out / cfg.tokenizer_name).write_bytes((ASSETS / "tokenizer_tiny.model").read_bytes())
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    print(f"wrote {out}: {size:.2f} GB in {time.perf_counter() - start:.0f} s")


def _sizes(mib: float) -> str:
    return f"{mib:.0f} MiB ({mib * 2 ** 20 / 1e9:.2f} GB, {mib / 1024:.2f} GiB)"


def child(cmd: list[str]) -> tuple[int, float, float]:
    """Run cmd; (exit status, peak RSS in MiB, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.perf_counter() - start


def _int4_folder(folder: Path, scheme: str) -> Path:
    return folder / ("int4" if scheme == "symmetric" else "int4-asym")


def quantize(folder: Path, bits: int, scheme: str) -> None:
    out = _int4_folder(folder, scheme) if bits == 4 else folder / f"int{bits}"
    code, peak, wall = child([sys.executable, "-m", "openmoshi", "quantize", str(folder / "bf16"), str(out),
                              "--bits", str(bits), "--int4-scheme", scheme, "--force"])
    print(f"openmoshi quantize --bits {bits}: exit {code}, peak RSS {_sizes(peak)}, "
          f"{wall:.0f} s; folder {sum(f.stat().st_size for f in out.iterdir()) / 1e9:.2f} GB")


def worker(folder: Path, steps: int, threads: int, dtype: str, quiet_s: int, kv_cache: str = "float",
           full_steps: int = 0) -> None:
    from openmoshi.bundle import load_model
    from openmoshi.generation.generator import Generator
    from openmoshi.nn.transformer import Attention

    torch.set_num_threads(threads)
    report = {"start": rss_mb(), "kv_cache": kv_cache}
    start = time.perf_counter()
    bundle = load_model(folder, dtype=getattr(torch, dtype), kv_cache=kv_cache)
    report["load_s"] = time.perf_counter() - start
    report["loaded"] = rss_mb()
    print(f"loaded in {report['load_s']:.0f} s, RSS {report['loaded']}", flush=True)
    lm = bundle.lm
    gen = Generator(lm)
    user = torch.randint(0, 2048, (1, lm.cfg.n_user, 1), generator=torch.Generator().manual_seed(0))
    times = []
    quiet = None
    if quiet_s:  # pause the background training (/work/bin/quiet) while the steps are timed, not while loading
        quiet = subprocess.Popen(["/work/bin/quiet", "sleep", str(quiet_s)])
        time.sleep(2)
    with torch.inference_mode(), gen.streaming(1):
        for i in range(steps):
            t = time.perf_counter()
            gen.step(user)
            times.append(time.perf_counter() - t)
            if i == 0:
                report["first_step"] = rss_mb()
            if i + 1 in (1, 10, 20, 50, 100, 200, 300, 500, 1000):
                report[f"rss_{i + 1}"] = rss_mb()
            print(f"step {i}: {times[-1]:.2f} s, RSS {rss_mb()[0]:.0f} MiB", flush=True)
        report["stepped"] = rss_mb()
        if quiet is not None:
            report["quiet_left"] = quiet.poll() is None  # True: every step ran while the training was paused
            quiet.wait()
        states = [m._streaming_state for m in lm.transformer.modules()
                  if isinstance(m, Attention) and m._streaming_state]
        cache = sum(t.nbytes for s in states for t in (s.keys, s.values, s.key_scales, s.value_scales)
                    if t is not None)
        for state in states:  # as after 3000 steps: every slot of the caches written (they take RAM as they fill)
            for t in (state.keys, state.values, state.key_scales, state.value_scales):
                if t is not None:
                    t.mul_(1)
        report["full_context"] = rss_mb()
        print(f"every KV slot written: RSS {report['full_context']}", flush=True)
        if full_steps:  # step time with a full context: every slot attended to, as from the 3000th step on
            tstate = lm.transformer._streaming_state
            capacity = tstate.key_positions.shape[1]
            seen = lm.cfg.context
            slots = torch.arange(capacity)
            tstate.key_positions.copy_(torch.where(slots < seen, slots, -1)[None])  # as after `seen` steps
            tstate.offsets.fill_(seen)
            tstate.host_offsets = [seen]
            tstate.step = seen
            quiet = subprocess.Popen(["/work/bin/quiet", "sleep", str(quiet_s or min(220, 20 + 12 * full_steps))])
            time.sleep(2)
            full = []
            for i in range(full_steps):
                t = time.perf_counter()
                gen.step(user)
                full.append(time.perf_counter() - t)
                print(f"full-context step {i}: {full[-1]:.2f} s", flush=True)
            report["full_quiet_left"] = quiet.poll() is None
            quiet.wait()
            report["full_step_ms"] = [round(t * 1000, 1) for t in full]
            report["full_step_median_ms"] = statistics.median(full[1:] or full) * 1000
            report["after_full_steps"] = rss_mb()
    report["temporal_kv_cache_full_mb"] = cache / 2 ** 20
    report["step_ms"] = [round(t * 1000, 1) for t in times]
    report["step_median_ms"] = statistics.median(times[1:] or times) * 1000
    report["step_median_first20_ms"] = statistics.median(times[1:20] or times) * 1000
    print("REPORT " + json.dumps(report))


def zeros_ab(folder: Path, steps: int, threads: int, quiet_s: int) -> None:
    """Symmetric int4 only: the same loaded model stepped with the kernels' zeros built per call (as it runs)
    and held beside the scales (as an asymmetric layer holds them, +0.5 bit per weight), step by step
    alternating; prints the median step of each."""
    from openmoshi.bundle import load_model
    from openmoshi.generation.generator import Generator
    from openmoshi.nn.quant import QuantizedLinear, _with_zeros

    torch.set_num_threads(threads)
    lm = load_model(folder / "int4").lm
    kernels = [k for m in lm.modules() if isinstance(m, QuantizedLinear) and m.bits == 4 for k in m.kernels()]
    own = {id(k): k.scales for k in kernels if k.symmetric}
    held = {id(k): _with_zeros(k.scales).clone() for k in kernels if k.symmetric}
    print(f"{len(held)} symmetric int4 kernels; held zeros would take "
          f"{sum(t.nbytes - own[i].nbytes for i, t in held.items()) / 2 ** 20:.0f} MiB", flush=True)

    def use(per_call: bool) -> None:
        for k in kernels:
            if id(k) in own:
                k.symmetric, k.scales = (True, own[id(k)]) if per_call else (False, held[id(k)])
    gen = Generator(lm)
    user = torch.randint(0, 2048, (1, lm.cfg.n_user, 1), generator=torch.Generator().manual_seed(0))
    times: dict[bool, list[float]] = {True: [], False: []}
    quiet = subprocess.Popen(["/work/bin/quiet", "sleep", str(quiet_s)]) if quiet_s else None
    time.sleep(2 if quiet else 0)
    with torch.inference_mode(), gen.streaming(1):
        for i in range(2 * steps + 2):
            per_call = i % 2 == 0
            use(per_call)
            start = time.perf_counter()
            gen.step(user)
            if i >= 2:
                times[per_call].append(time.perf_counter() - start)
    if quiet is not None:
        print(f"quiet period left: {quiet.poll() is None}")
        quiet.wait()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"step median over {steps}: zeros built per call {med[True]:.0f} ms, held {med[False]:.0f} ms "
          f"({med[True] / med[False]:.2f}x); all: per call {[round(t * 1000) for t in times[True]]}, "
          f"held {[round(t * 1000) for t in times[False]]}")


def run(folder: Path, steps: int, threads: int, dtype: str, quiet_s: int, scheme: str, kv_cache: str,
        full_steps: int) -> None:
    code, peak, wall = child([sys.executable, __file__, "worker", str(_int4_folder(folder, scheme)),
                              "--steps", str(steps), "--kv-cache", kv_cache, "--full-steps", str(full_steps),
                              "--threads", str(threads), "--dtype", dtype, "--quiet", str(quiet_s)])
    print(f"load int4 ({scheme}) + {steps} steps ({dtype} activations, {kv_cache} KV cache, {threads} threads)"
          f"{f', then all KV slots written and {full_steps} full-context steps' if full_steps else ''}: exit {code}, "
          f"peak RSS {_sizes(peak)}, {wall:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["write", "quantize", "run", "worker", "zeros-ab"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--int4-scheme", default="symmetric", choices=["symmetric", "asymmetric"])
    parser.add_argument("--kv-cache", default="float", choices=["float", "bf16", "int8", "int4"],
                        help="run: how the temporal transformer's cache stores keys and values")
    parser.add_argument("--full-steps", type=int, default=0,
                        help="run: then time this many steps with a full context (all slots attended to), "
                             "under /work/bin/quiet")
    parser.add_argument("--quiet", type=int, default=0, help="run: pause the background training for this many "
                                                              "seconds (/work/bin/quiet) while the steps run")
    args = parser.parse_args()
    if args.what == "write":
        write(args.folder)
    elif args.what == "quantize":
        quantize(args.folder, args.bits, args.int4_scheme)
    elif args.what == "zeros-ab":
        zeros_ab(args.folder, args.steps, args.threads, args.quiet)
    elif args.what == "run":
        run(args.folder, args.steps, args.threads, args.dtype, args.quiet, args.int4_scheme, args.kv_cache,
            args.full_steps)
    else:
        worker(args.folder, args.steps, args.threads, args.dtype, args.quiet, args.kv_cache, args.full_steps)


if __name__ == "__main__":
    main()
