"""Moshi LM speed on CPU: one Generator.step (one 80 ms frame: temporal pass, text sampling, 8 depth steps).

    python benchmarks/bench_lm.py [--config bench] [--threads 2] [--steps 30] [--warmup 5] [--batch 1 4]
                                  [--no-reference]

Ours and Kyutai's reference LMGen (moshi==0.2.13, when importable) run in one process on the same random
weights, fp32, with the default sampling settings. Rounds alternate between the two so that load from other
processes hits both alike; each number is the median step time in ms. Steps run early in a conversation
(a few dozen frames into the context).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from openmoshi.generation.generator import Generator
from openmoshi.lm.config import PRESETS, LMConfig
from openmoshi.lm.model import LMModel

# config.json keys that Kyutai's CheckpointInfo consumes before building its LMModel
_FILE_KEYS = {"model_type", "moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name", "lora",
              "lora_rank", "lora_scaling", "lm_gen_config", "tts_config", "stt_config", "model_id"}


def time_interleaved(sessions: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median step time of each session, stepped in 3 interleaved rounds (so load drifts hit all alike); closes
    them."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.steps(warmup)
    rounds = 3
    for r in range(rounds):
        for name, session in sessions.items():
            times[name] += session.steps(steps // rounds + (r < steps % rounds))
    for session in sessions.values():
        session.close()
    return {name: statistics.median(t) for name, t in times.items()}


def build_models(cfg: LMConfig, reference: bool, seed: int = 0) -> tuple[LMModel, torch.nn.Module | None]:
    torch.manual_seed(seed)
    ours = LMModel(cfg).eval()
    ref = None
    if reference:
        try:
            from moshi.models.lm import LMModel as RefLM
        except ImportError:
            return ours, None
        ref = RefLM(**{k: v for k, v in cfg.to_kyutai().items() if k not in _FILE_KEYS}).eval()
        ref.load_state_dict(ours.state_dict())
    return ours, ref


class _Session:
    """A running generation session whose steps can be timed in rounds."""

    def __init__(self, gen, batch: int, n_user: int, seed: int) -> None:
        self.gen, self.batch = gen, batch
        self.user = torch.randint(0, 2048, (batch, n_user, 1), generator=torch.Generator().manual_seed(seed))
        self._ctx = gen.streaming(batch)
        self._ctx.__enter__()

    @torch.inference_mode()
    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.gen.step(self.user)
            times.append((time.perf_counter() - start) * 1000)
        return times

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


def bench(cfg: LMConfig, batches: list[int], steps: int, warmup: int, reference: bool) -> list[tuple]:
    ours, ref = build_models(cfg, reference)
    rows = []
    for batch in batches:
        sessions = {"openmoshi": _Session(Generator(ours), batch, cfg.n_user, seed=batch)}
        if ref is not None:
            from moshi.models.lm import LMGen
            sessions["reference"] = _Session(LMGen(ref), batch, cfg.n_user, seed=batch)
        med = time_interleaved(sessions, steps, warmup)
        rows.append((batch, med["openmoshi"], med.get("reference")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.config]()
    params = sum(p.numel() for p in LMModel(cfg).parameters()) if args.config != "moshi_7b" else 7.69e9
    print(f"LM config {args.config!r} ({params / 1e6:.0f} M parameters), fp32, {args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup}")
    rows = bench(cfg, args.batch, args.steps, args.warmup, not args.no_reference)
    print(f"{'batch':>5} | {'openmoshi ms/step':>17} | {'reference ms/step':>17} | {'speed-up':>8}")
    print(f"{'-' * 5}-+-{'-' * 17}-+-{'-' * 17}-+-{'-' * 8}")
    for batch, ours, ref in rows:
        ref_s = f"{ref:17.1f}" if ref is not None else f"{'n/a':>17}"
        speed = f"{ref / ours:7.2f}x" if ref is not None else f"{'':>8}"
        print(f"{batch:>5} | {ours:17.1f} | {ref_s} | {speed}")


if __name__ == "__main__":
    main()
