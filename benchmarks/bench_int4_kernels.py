"""int4 formats side by side: the matmuls of one Moshi 7B step (batch 1), asymmetric vs symmetric layers.

    python benchmarks/bench_int4_kernels.py [--threads 2] [--rounds 20]

Both run torch's `_weight_int4pack_mm_for_cpu`; the asymmetric layer holds the kernel's [G, N, 2] scales and
zeros, the symmetric one only its scales (the zeros are added per call, nn/quant.py `_with_zeros`). Each
shape of the 7B (configs/moshi_7b_202409.json: temporal 4096, depth 1024 x 8 steps) is timed with the two
layers alternating call by call (random weights, one bf16 row); the step total weighs each shape's median
by its calls per step. Only matmuls: embeddings, attention and norms are not in it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from openmoshi.nn.quant import QuantizedLinear

# (out, in): calls per step (32 temporal layers; 8 depth steps x 6 layers, their input and output heads)
SHAPES = {(12288, 4096): 32, (4096, 4096): 32, (22528, 4096): 32, (4096, 11264): 32, (32000, 4096): 1,
          (1024, 4096): 8, (3072, 1024): 48, (1024, 1024): 48, (5632, 1024): 48, (1024, 2816): 48,
          (2048, 1024): 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = {False: 0.0, True: 0.0}
    print(f"{'shape':>13} | calls | asymmetric ms | symmetric ms | ratio")
    with torch.inference_mode():
        for (n, k), calls in SHAPES.items():
            w = torch.randn(n, k) * 0.02
            layers = {s: QuantizedLinear.from_weight(w, 4, symmetric=s) for s in (False, True)}
            x = torch.randn(1, k)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(args.rounds + 2):
                for s, layer in layers.items():
                    start = time.perf_counter()
                    layer(x)
                    if i >= 2:
                        times[s].append(time.perf_counter() - start)
            med = {s: statistics.median(t) * 1000 for s, t in times.items()}
            for s in total:
                total[s] += med[s] * calls
            print(f"{n:>6}x{k:<6} | {calls:>5} | {med[False]:13.3f} | {med[True]:12.3f} | {med[True] / med[False]:.2f}",
                  flush=True)
    print(f"one 7B step's matmuls: asymmetric {total[False]:.0f} ms, symmetric {total[True]:.0f} ms "
          f"({total[True] / total[False]:.2f}x)")


if __name__ == "__main__":
    main()
