"""Train a SentencePiece text tokenizer for a small Moshi: unigram, digits split, byte fallback (Helium's
options), with Kyutai's id layout (<unk> 0 = the text stream's EPAD, <pad> 3 = PAD).

  openmoshi data tokenizer --input corpus.txt --out tokenizer.model --vocab-size 4000
  openmoshi data tokenizer --input synth/ --out synth_tokenizer.model   # the words of a data set
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.tokenizer import EPAD_ID, PAD_ID, corpus_lines, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help="text files (one sentence per line) and/or data sets (folders or .jsonl manifests)")
    parser.add_argument("--out", type=Path, required=True, help="output .model file")
    parser.add_argument("--vocab-size", type=int, default=4000,
                        help="vocabulary size (a small corpus may give fewer pieces); Kyutai's 7B uses 32000")
    parser.add_argument("--character-coverage", type=float, default=0.99995,
                        help="share of characters covered by pieces; the rest go through byte fallback")


def run(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    lines = corpus_lines(args.input)
    path = train_tokenizer(lines, args.out, args.vocab_size, args.character_coverage)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    print(f"wrote {path}: {sp.get_piece_size()} pieces from {len(lines)} lines; "
          f"EPAD id {EPAD_ID} = {sp.id_to_piece(EPAD_ID)}, PAD id {PAD_ID} = {sp.id_to_piece(PAD_ID)}")
    return 0
