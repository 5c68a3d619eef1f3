"""SentencePiece text tokenizers for small models, trained the way Helium's was (Moshi paper, section 3.1):
unigram model, digits split into single tokens, byte fallback for anything unseen; ids laid out as Kyutai's
(`<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3), so the text stream's EPAD = 0 and PAD = 3 as in moshi-finetune."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError
from .format import read_alignments

logger = logging.getLogger(__name__)

EPAD_ID, PAD_ID = 0, 3  # existing_text_end_padding_id, existing_text_padding_id


def dataset_lines(root: Path) -> list[str]:
    """One line of text per speaker turn of every dialogue of a data set (words in time order)."""
    from .stats import find_dialogues
    lines = []
    for wav, _ in find_dialogues(root):
        words = read_alignments(wav.with_suffix(".json"))
        current, speaker = [], None
        for w in sorted(words, key=lambda w: w.start):
            if w.speaker != speaker and current:
                lines.append(" ".join(current))
                current = []
            speaker = w.speaker
            current.append(w.text)
        if current:
            lines.append(" ".join(current))
    return lines


def corpus_lines(inputs: Iterable[Path]) -> list[str]:
    """Text lines from plain-text files and from data sets (folders or .jsonl manifests with alignments)."""
    lines: list[str] = []
    for path in map(Path, inputs):
        if path.is_dir() or path.suffix == ".jsonl":
            lines += dataset_lines(path)
        elif path.is_file():
            lines += [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        else:
            raise ConfigError(f"tokenizer input {path} not found (give text files or data sets)")
    if not lines:
        raise ConfigError("the tokenizer corpus is empty: give text files with one sentence per line")
    return lines


def train_tokenizer(lines: list[str], out: Path, vocab_size: int = 4000, character_coverage: float = 0.99995,
                    max_sentence_length: int = 16384) -> Path:
    """Train and write `out` (a .model file); returns its path. The vocabulary may come out smaller than asked
    for when the corpus is small (never larger)."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise ConfigError("--vocab-size must be at least 300 (256 byte pieces + special ids + characters)")
    out = Path(out)
    if out.suffix != ".model":
        raise ConfigError(f"{out}: the tokenizer file name must end in .model")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            split_digits=True, byte_fallback=True, character_coverage=character_coverage,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            pad_piece="<pad>", hard_vocab_limit=False, max_sentence_length=max_sentence_length,
            minloglevel=2)
    except RuntimeError as exc:
        raise ConfigError(f"SentencePiece could not train on this corpus: {exc}") from exc
    from .format import atomic_write_bytes
    atomic_write_bytes(out, model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(out))
    logger.info("tokenizer %s: %d pieces from %d lines", out, processor.get_piece_size(), len(lines))
    return out
