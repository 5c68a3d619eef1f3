"""Write a model folder whose LM has int8 or int4 weights; it loads quantized, as stored, tensor by tensor.

  openmoshi quantize MODEL OUT --bits 8    # int8 per output channel: Kyutai's q8 layout, ~1/4 of fp32
  openmoshi quantize MODEL OUT --bits 4    # int4 in groups of 32, one scale each (4.5 bits): ~1/7 of fp32
  openmoshi quantize MODEL OUT --bits 4 --int4-scheme asymmetric   # a scale and a zero per group (5 bits)

MODEL is a float model folder (or hf://owner/repo). The float LM is read, quantized and written one weight at
a time, so the model is never held in memory (Moshi 7B: ~2.1 GB peak). Embedding tables keep their stored
dtype (bf16 in Kyutai's files). Mimi and the tokenizer are copied unchanged (Mimi's
transformers are quantized to int8 when the folder is loaded). Then:
  openmoshi infer --model OUT speech.wav      openmoshi serve --model OUT
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="float model folder or hf://owner/repo (Kyutai's layout)")
    parser.add_argument("output", type=Path, help="folder to write (created)")
    parser.add_argument("--bits", type=int, default=8, help="8 (int8, per output channel) or 4 (int4, groups "
                                                            "of --group-size input columns); default 8")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32, as the paper)")
    parser.add_argument("--int4-scheme", default="symmetric", choices=["symmetric", "asymmetric"],
                        help="int4: one bf16 scale per group (symmetric, 4.5 bits per weight, the default) or a "
                             "scale and a zero (asymmetric, 5 bits; the format of folders written before)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..lm.loading import read_config
    from ..lm.quantized import copy_model_files, write_quantized_lm
    from ..nn.quant import check_bits

    check_bits(args.bits)
    if args.bits == 4 and (args.group_size <= 0 or args.group_size % 2):
        raise ConfigError(f"--group-size {args.group_size}: use a positive even number (32 is the default)")
    if args.output.exists() and any(args.output.iterdir()) and not args.force:
        raise ConfigError(f"{args.output} exists and is not empty; use --force to write into it")
    start = time.perf_counter()
    cfg, _ = read_config(args.model)
    _, layers = write_quantized_lm(args.model, args.output, args.bits, args.group_size,
                                   symmetric=args.int4_scheme == "symmetric")
    copy_model_files(args.model, args.output, cfg)
    size = sum(f.stat().st_size for f in args.output.iterdir()) / 1e6
    print(f"wrote {args.output}: {layers} int{args.bits} linear layers, {size:.1f} MB in all, "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"next: openmoshi infer --model {args.output} speech.wav   or   openmoshi serve --model {args.output}")
    return 0
