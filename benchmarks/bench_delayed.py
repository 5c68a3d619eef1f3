"""Moshi-style ASR and TTS through delays (paper §5.7) on CPU: the LM's step time, ours and Kyutai's reference
(moshi==0.2.13's LMGen driven the same way) in the same run, on the same random weights, fp32, batch 1.

    python benchmarks/bench_delayed.py [--threads 1] [--steps 40] [--rounds 3] [--small]

ASR: the audio is forced into Moshi's stream (no depth transformer: `replace_audio` / the reference's
`depformer_replace_tokens`), the text sampled greedily. TTS: the text forced by `MoshiTextForcer` (ours; in the
reference's `on_text_hook`), the depth transformer samples the audio. Shape: the `bench` preset (dim 1024, 12
layers) as a single-stream Moshi with delays [25, 0, 1, ...] (ASR) or [0, 25, 26, ...] (TTS); `--small` uses the
tiny one. Medians over rounds that alternate between the two implementations; Mimi's time is not included.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from bench_dsm import reference_lm

from openmoshi.generation.delayed import MoshiTextForcer
from openmoshi.generation.generator import Generator
from openmoshi.generation.tts import TtsTokens, Word
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel

ASR_DELAYS = [25, 0, 1, 1, 1, 1, 1, 1, 1]
TTS_DELAYS = [0, 25, 26, 26, 26, 26, 26, 26, 26]


def model(small: bool, delays: list[int]) -> LMModel:
    base = LMConfig.tiny() if small else LMConfig.bench()
    torch.manual_seed(0)
    return LMModel(dataclasses.replace(base, n_q=8, dep_q=8, delays=delays)).eval()


def words(n: int) -> list[Word]:
    return [Word([10 + i % 50, 70 + i % 30], f"w{i}") for i in range(n)]


@torch.no_grad()
def ours(lm: LMModel, mode: str, steps: int) -> float:
    empty = torch.zeros(1, 0, 1, dtype=torch.long)
    codes = torch.randint(0, lm.cfg.card, (steps, 1, 8), generator=torch.Generator().manual_seed(1))
    if mode == "asr":
        gen = Generator(lm, temp_text=0.0)
    else:
        forcer, state = MoshiTextForcer(TtsTokens(lm.cfg.text_card + 1)), None
        state = forcer.start(words(steps))
        gen = Generator(lm, temp=0.0, temp_text=0.0,
                        text_hook=lambda t: torch.tensor([forcer.step(0, state, t[0].item())]))
    with gen.streaming(1):
        start = time.perf_counter()
        for s in range(steps):
            gen.step(None if not lm.cfg.n_user else empty, replace_audio=codes[s] if mode == "asr" else None)
        return (time.perf_counter() - start) / steps


@torch.no_grad()
def reference(lm: LMModel, mode: str, steps: int) -> float:
    from moshi.models.lm import LMGen
    ref = reference_lm(lm)
    empty = torch.zeros(1, 0, 1, dtype=torch.long)
    codes = torch.randint(0, lm.cfg.card, (steps, 1, 8), generator=torch.Generator().manual_seed(1))
    hook = None
    if mode == "tts":
        forcer = MoshiTextForcer(TtsTokens(lm.cfg.text_card + 1))
        state = forcer.start(words(steps))

        def hook(token: torch.Tensor) -> None:
            token[0] = forcer.step(0, state, token[0].item())
    gen = LMGen(ref, temp=0.0, temp_text=0.0, on_text_hook=hook)
    with gen.streaming(1):
        start = time.perf_counter()
        for s in range(steps):
            gen.step(empty, depformer_replace_tokens=codes[s][..., None] if mode == "asr" else None)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, {args.steps} steps x {args.rounds} rounds, {'tiny' if args.small else 'bench'}")
    print("| mode | ours ms/step | moshi 0.2.13 ms/step | ours / ref |")
    print("| --- | --- | --- | --- |")
    for mode, delays in (("asr", ASR_DELAYS), ("tts", TTS_DELAYS)):
        lm = model(args.small, delays)
        ours(lm, mode, 5), reference(lm, mode, 5)  # warm-up
        a, b = [], []
        for _ in range(args.rounds):
            a.append(ours(lm, mode, args.steps))
            b.append(reference(lm, mode, args.steps))
        x, y = statistics.median(a) * 1000, statistics.median(b) * 1000
        print(f"| {mode} | {x:.1f} | {y:.1f} | {x / y:.2f} |")


if __name__ == "__main__":
    main()
