"""KV cache kinds (float / bf16 / int8 / int4) of the temporal transformer: step time of one attention layer at a given
context, memory per step, and attention error against the float cache, at Moshi 7B's shape.

    python benchmarks/bench_kv_cache.py [--context 3000] [--batch 1] [--rounds 20] [--threads 2]

One transformer layer with the 7B's attention (d_model 4096, 32 heads of 128; a tiny MLP so that the step is
the attention's: projections, cache write, cache read, softmax) is built once per kind with the same weights.
Its cache is filled with the keys and values of random inputs (written through the cache, as steps write them),
its positions set as after `--context` steps, and one more step is timed, rounds alternating between the kinds
(median). The 7B has 32 such layers: the table shows the per-layer time and x32. Error: relative L2 error of
that step's attention output against the float cache's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openmoshi.nn.transformer import Transformer, TransformerConfig

KINDS = ("float", "bf16", "int8", "int4")


def build(kind: str, context: int, batch: int) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=4096, num_heads=32, num_layers=1, dim_feedforward=48, context=context,
                            norm="rms_norm_f32", gating="silu")
    model = Transformer(cfg).eval()
    model.set_kv_cache(kind)
    return model


@torch.inference_mode()
def fill(model: Transformer, context: int, batch: int) -> None:
    """Write keys and values of random [B, H, context, D] into every item's cache; positions as after `context`
    steps, so that the next step attends to all of them."""
    state = model._streaming_state
    attn = model.layers[0].self_attn._streaming_state
    gen = torch.Generator().manual_seed(1)
    shape = (batch, 32, context, 128)
    slots = torch.arange(context)[None].expand(batch, context)
    items = torch.arange(batch)[:, None].expand(batch, context)
    attn.write(items, slots, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    capacity = state.key_positions.shape[1]
    ring = torch.arange(capacity)
    state.key_positions.copy_(torch.where(ring < context, ring, -1)[None].expand(batch, capacity))
    state.offsets.fill_(context)
    state.host_offsets = [context] * batch
    state.step = context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {kind: build(kind, args.context, args.batch) for kind in KINDS}
    x = torch.randn(args.batch, 1, 4096, generator=torch.Generator().manual_seed(2))
    outputs, times = {}, {kind: [] for kind in KINDS}
    cache_bytes = {}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for kind, model in models.items():
            stack.enter_context(model.streaming(args.batch))
            fill(model, args.context, args.batch)
            attn = model.layers[0].self_attn
            st = attn._streaming_state
            cache_bytes[kind] = sum(t.nbytes for t in (st.keys, st.values, st.key_scales, st.value_scales)
                                    if t is not None) / st.keys.shape[2] / args.batch
            handle = attn.register_forward_hook(lambda mod, a, out, kind=kind: outputs.setdefault(kind, out))
            model(x)
            handle.remove()
        for _ in range(args.rounds):  # the same step again (positions do not move: the ring stays full)
            for kind, model in models.items():
                state = model._streaming_state
                start = time.perf_counter()
                model(x)
                times[kind].append(time.perf_counter() - start)
                state.offsets.fill_(args.context)
                state.host_offsets = [args.context] * args.batch
    ref = outputs["float"]
    print(f"one 7B attention layer, context {args.context}, batch {args.batch}, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds:")
    print(f"{'cache':>6} | {'ms/layer':>8} | {'x32 ms':>7} | {'KiB per step, layer':>19} | {'x32 MiB':>7} | "
          f"attention rel. error")
    for kind in KINDS:
        ms = statistics.median(times[kind]) * 1000
        err = ((outputs[kind] - ref).norm() / ref.norm()).item()
        print(f"{kind:>6} | {ms:8.1f} | {ms * 32:7.0f} | {cache_bytes[kind] / 1024:19.1f} | "
              f"{cache_bytes[kind] * 32 / 2 ** 20:7.3f} | {err:.2e}")


if __name__ == "__main__":
    main()
