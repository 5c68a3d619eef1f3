"""Phone purity of a codebook (as HuBERT's paper measures its units): how well one code tells which sound is spoken.

Each frame with speech gets its dominant unit (the phoneme, or letter, sounding longest in it, from the word
alignments beside the audio; frames less than half covered are silence and left out). A map code -> its most
frequent unit is fitted on some files and scored on others: fitted on training voices and scored on held-out
ones, it says whether the codebook names sounds whoever speaks them.

    frames: [(code, unit)] per file -> fit: {code: unit} -> purity = share of frames whose code maps to their unit
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from ..train.codec.alignment_teacher import AlignmentTeacher, frame_overlaps


def dominant_units(teacher: AlignmentTeacher, words, num_frames: int, frame_seconds: float) -> list[str | None]:
    """Per frame, the unit sounding longest in it when it covers at least half the frame, else None."""
    best: list[tuple[float, str | None]] = [(0.5 * frame_seconds - 1e-9, None)] * num_frames  # float slack
    for f, symbol, overlap in frame_overlaps(teacher.unit_spans(words), num_frames, frame_seconds):
        if overlap >= best[f][0]:
            best[f] = (overlap, symbol)
    return [unit for _, unit in best]


def fit_code_map(pairs: Iterable[tuple[int, str]]) -> dict[int, str]:
    counts: dict[int, Counter] = defaultdict(Counter)
    for code, unit in pairs:
        counts[code][unit] += 1
    return {code: c.most_common(1)[0][0] for code, c in counts.items()}


def phone_purity(fit_pairs: list[tuple[int, str]], eval_pairs: list[tuple[int, str]]) -> dict[str, float]:
    """purity on eval_pairs of the map fitted on fit_pairs; the majority unit's share as a baseline; the share of
    eval frames whose code never occurred in the fit (counted wrong)."""
    if not fit_pairs or not eval_pairs:
        return {}
    mapping = fit_code_map(fit_pairs)
    majority = Counter(u for _, u in fit_pairs).most_common(1)[0][0]
    hits = sum(mapping.get(code) == unit for code, unit in eval_pairs)
    return {"phone_purity": hits / len(eval_pairs),
            "phone_purity_majority": sum(u == majority for _, u in eval_pairs) / len(eval_pairs),
            "phone_purity_unseen": sum(code not in mapping for code, _ in eval_pairs) / len(eval_pairs),
            "phone_purity_frames": float(len(eval_pairs)), "phone_purity_codes": float(len(mapping))}
