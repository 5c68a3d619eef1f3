"""Spoken-dialogue evaluation of a Moshi model on the tiny-talk domain (openmoshi/data/synth/talk.py).

Each case is one user recording, mono 24 kHz:

    | 1.0 s silence | question, spoken by a held-out user voice | 4.0 s silence |
                    ^ start                                      ^ end

Moshi runs over it offline, frame by frame (the Generator loop `openmoshi infer` uses), and we score:

- answer: the text Moshi writes from the frame holding the question's start to the end of the case contains the
  answer word (case, punctuation and digits normalised: "12" -> "twelve"; whole-word match) more often than the
  question does ("What color is an orange?" is not answered by "An orange is yellow.");
- turn-taking: of the frames (80 ms) that overlap the user's words, the share in which Moshi is silent. Text
  version: Moshi's text token is PAD/EPAD (no word piece). Audio version: the RMS of Moshi's decoded audio in the
  frame is below AUDIO_REL_DB under Moshi's own level (the 95th percentile of its frame RMS over all cases) and
  never counts as speech below AUDIO_FLOOR_DB absolute;
- onset: seconds from the question's end to the start of Moshi's first text word starting in the frame holding
  the end or later (0 when it starts within that frame); cases with no such word are counted as unanswered.
"""

from __future__ import annotations

import json
import logging
import math
import re
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.synth.engines import Voice, festival_available, synthesize
from ..data.synth.mixing import PEAK
from ..data.synth.scripts import number_words
from ..data.synth.talk import PHRASINGS, Question, eval_questions
from ..data.synth.voices import ESPEAK_ACCENTS, MOSHI_VOICE, make_voice_bank, user_voice_pool
from ..errors import ConfigError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
LEAD_S = 1.0  # silence before the question
TAIL_S = 4.0  # silence after it: room for the answer
LEVEL_DB = -20.0  # the user's speech RMS, as the synth pipeline renders it
AUDIO_REL_DB = -20.0  # a frame is Moshi speaking when its RMS is at most this far below Moshi's level ...
AUDIO_FLOOR_DB = -50.0  # ... and above this absolute level (dBFS)
WORD_START = "\u2581"
# Synth sets written with default settings: their train voices must not be reused for evaluation.
DEFAULT_SYNTH = {"user_voices": 48, "seed": 0, "moshi_voice": MOSHI_VOICE, "engines": ["espeak", "festival"],
                 "accents": list(ESPEAK_ACCENTS), "valid_fraction": 0.05, "test_fraction": 0.05}
# The tiny-talk recipe's synth set (recipes/tiny_talk.py, the shipped model's data): its train voices are not
# reused either.
TINY_TALK_SYNTH = {**DEFAULT_SYNTH, "user_voices": 320}
EVAL_VOICE_SEED = 90_210  # far from any synth seed a recipe would use
TARGETS = {"accuracy": 0.80, "silent_share_text": 0.95, "onset_median_s": 1.0}


# --- held-out voices and cases ---------------------------------------------------------------------------------

def _bank(settings: dict):
    fractions = {"valid": float(settings["valid_fraction"]), "test": float(settings["test_fraction"])}
    fractions["train"] = 1 - fractions["valid"] - fractions["test"]
    return make_voice_bank(int(settings["user_voices"]), int(settings["seed"]), fractions,
                           settings["moshi_voice"], tuple(settings["engines"]), tuple(settings["accents"]))


def held_out_voices(voices_from: str | Path | None = None, count: int = 8, seed: int = 0,
                    split: str = "test") -> list[Voice]:
    """User voices nobody trained on. With `voices_from` (a synth set's folder): that set's *test* voices, rebuilt
    from its synth_config.json. Without: `count` espeak-ng voices drawn from a seed far from the synth's, none
    equal to a train voice of a default synth set, of the tiny-talk recipe's, or to Moshi's voice."""
    if voices_from is not None:
        path = Path(voices_from) / "synth_config.json"
        if not path.is_file():
            raise ConfigError(f"--voices-from {voices_from}: no synth_config.json there; give the folder "
                              "`openmoshi data synth --out` wrote")
        try:
            settings = {**DEFAULT_SYNTH, **json.loads(path.read_text())}
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
        if "festival" in settings["engines"] and not festival_available():
            logger.warning("%s was made with festival voices available, but festival is not installed here: "
                           "its voice bank, so its test voices, may not be rebuilt exactly", voices_from)
        voices = _bank(settings).users[split]
        if split == "train":  # a diagnostic: the first `count` voices the model trained on
            voices = voices[:count]
        logger.info("user voices: the %d %s voice(s) of %s", len(voices), split, voices_from)
        if not voices:
            raise ConfigError(f"{voices_from}: the set has no test voices (test_fraction 0); evaluate without "
                              "--voices-from to draw unseen voices")
        return voices
    train = {v.key for settings in (DEFAULT_SYNTH, TINY_TALK_SYNTH) for v in _bank(settings).users["train"]}
    moshi = Voice.parse(MOSHI_VOICE)
    pool = user_voice_pool(count * 4, EVAL_VOICE_SEED + seed, ("espeak",), exclude=moshi)
    voices = [v for v in pool if v.key not in train and v.key != moshi.key][:count]
    if len(voices) < count:
        raise ConfigError(f"could only draw {len(voices)} unseen voices")
    logger.info("user voices: %d espeak-ng voices unseen by a default synth set", len(voices))
    return voices


@dataclass
class TalkCase:
    """One user recording: a question with its known timing."""

    question: Question
    voice: str  # Voice.key
    audio: np.ndarray  # float32 [T], 24 kHz
    words: list[tuple[str, float, float]]  # the user's words, seconds from the recording's start
    start: float  # the question's first word starts (s)
    end: float  # its last word ends (s)

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def build_cases(questions: list[Question], voices: list[Voice], lead_s: float = LEAD_S,
                tail_s: float = TAIL_S, level_db: float = LEVEL_DB) -> list[TalkCase]:
    """Speak each question (case i in voices[i % len(voices)]) between `lead_s` and `tail_s` of silence, at an
    RMS of `level_db` dBFS (peak-limited like the synth pipeline's rendering)."""
    if not voices:
        raise ConfigError("no user voices to speak the questions with")
    jobs = [(q.text.split(), voices[i % len(voices)]) for i, q in enumerate(questions)]
    cases = []
    for (words, voice), q, speech in zip(jobs, questions, synthesize(jobs)):
        audio = speech.audio.astype(np.float64)
        audio *= 10 ** (level_db / 20) / max(float(np.sqrt(np.mean(audio ** 2))), 1e-9)
        audio *= min(1.0, PEAK / max(float(np.max(np.abs(audio))), 1e-9))
        lead, tail = round(lead_s * SAMPLE_RATE), round(tail_s * SAMPLE_RATE)
        padded = np.concatenate([np.zeros(lead), audio, np.zeros(tail)]).astype(np.float32)
        timed = [(w, lead_s + a, lead_s + b) for w, a, b in speech.words]
        cases.append(TalkCase(q, voice.key, padded, timed, timed[0][1], lead_s + speech.duration))
    return cases


# --- scoring -------------------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """Lower case, numbers as words ("12" -> "twelve"), every run of non-letters one space."""
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " " if len(m.group()) <= 3 else " ",
                  text.lower())
    return " ".join(re.sub(r"[^a-z']+", " ", text).replace("'", "").split())


def count_words(text: str, words: str) -> int:
    """How often `words` appear in `text` as whole words, after normalize_text on both."""
    want = normalize_text(words)
    return f" {normalize_text(text)} ".count(f" {want} ") if want else 0


def contains_answer(text: str, answer: str, question: str = "") -> bool:
    """Whether `text` says `answer` (whole words, normalize_text on both) more often than the question does: a reply
    that only repeats its subject ("An orange is yellow." to "What color is an orange?") does not answer."""
    return bool(normalize_text(answer)) and count_words(text, answer) > count_words(question, answer)


@dataclass
class TextWord:
    text: str
    frame: int  # frame of its first piece


def words_from_pieces(pieces: list[str | None]) -> list[TextWord]:
    """Moshi's words from its per-frame text pieces (None = PAD/EPAD/special); a piece starting with U+2581
    opens a word."""
    words: list[TextWord] = []
    for frame, piece in enumerate(pieces):
        if piece is None:
            continue
        if piece.startswith(WORD_START) or not words:
            words.append(TextWord(piece.replace(WORD_START, " "), frame))
        else:
            words[-1].text += piece.replace(WORD_START, " ")
    for w in words:
        w.text = w.text.strip()
    return [w for w in words if w.text]


def speech_frames(words: list[tuple[str, float, float]], frame_rate: float, frames: int) -> list[int]:
    """Frames [f / rate, (f + 1) / rate) that overlap any user word's [start, end) by a positive amount."""
    out: set[int] = set()
    for _, start, end in words:
        first = math.floor(start * frame_rate + 1e-9)
        last = math.ceil(end * frame_rate - 1e-9)  # exclusive
        out.update(range(max(first, 0), min(last, frames)))
    return sorted(out)


@dataclass
class CaseScore:
    kind: str
    question: str
    answer: str
    voice: str
    reply: str  # Moshi's text from the frame holding the question's start to the end of the case
    transcript: str  # all of Moshi's text
    correct: bool
    answered_early: bool  # the answer word is in Moshi's text before the frame holding the question's end
    onset_s: float | None  # None: no word started after the question ended
    user_frames: int  # frames overlapping the user's words
    silent_text: int  # of those, frames where Moshi's text was padding
    silent_audio: int | None  # of those, frames where Moshi's audio was quiet (None: audio not scored)
    onset_audio_s: float | None = None  # the same onset from Moshi's audio: its first speech frame after the end


def score_case(pieces: list[str | None], frame_rate: float, question: Question, user_words: list[tuple[str, float,
               float]], start: float, end: float, voice: str = "", speaking_audio: list[bool] | None = None
               ) -> CaseScore:
    """Score Moshi's side of one case from its text pieces, one per frame (None for padding)."""
    words = words_from_pieces(pieces)
    start_frame = math.floor(start * frame_rate + 1e-9)
    end_frame = math.floor(end * frame_rate + 1e-9)
    reply = " ".join(w.text for w in words if w.frame >= start_frame)
    before_end = " ".join(w.text for w in words if start_frame <= w.frame < end_frame)
    after = [w for w in words if w.frame >= end_frame]
    onset = max(0.0, after[0].frame / frame_rate - end) if after else None
    user = speech_frames(user_words, frame_rate, len(pieces))
    silent_audio = onset_audio = None
    if speaking_audio is not None:
        silent_audio = sum(1 for f in user if f < len(speaking_audio) and not speaking_audio[f])
        first = next((f for f in range(end_frame, len(speaking_audio)) if speaking_audio[f]), None)
        onset_audio = None if first is None else max(0.0, first / frame_rate - end)
    return CaseScore(question.kind, question.text, question.answer, voice, reply,
                     " ".join(w.text for w in words), contains_answer(reply, question.answer, question.text),
                     contains_answer(before_end, question.answer, question.text), onset, len(user),
                     sum(1 for f in user if pieces[f] is None), silent_audio, onset_audio)


def frame_rms(audio: np.ndarray, frame_size: int) -> np.ndarray:
    """RMS of each frame of a mono signal [T] (the last frame over the samples it has)."""
    frames = -(-len(audio) // frame_size)
    padded = np.zeros(frames * frame_size, dtype=np.float64)
    padded[: len(audio)] = audio
    energy = (padded.reshape(frames, frame_size) ** 2).sum(axis=1)
    counts = np.full(frames, frame_size, dtype=np.float64)
    if frames:
        counts[-1] = len(audio) - (frames - 1) * frame_size
    return np.sqrt(energy / counts)


def audio_threshold(rms_per_case: list[np.ndarray], rel_db: float = AUDIO_REL_DB,
                    floor_db: float = AUDIO_FLOOR_DB) -> float:
    """RMS above which a frame of Moshi's audio counts as speech: `rel_db` under Moshi's level (95th percentile
    of its frame RMS over every case), never under `floor_db` dBFS."""
    pooled = np.concatenate(rms_per_case) if rms_per_case else np.zeros(0)
    level = float(np.percentile(pooled, 95)) if len(pooled) else 0.0
    return max(level * 10 ** (rel_db / 20), 10 ** (floor_db / 20))


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(scores: list[CaseScore]) -> dict:
    """Totals over cases: accuracy (overall and per kind), silent shares pooled over all user speech frames,
    onset median / p90 over answered cases, and the targets each figure is held to."""
    kinds = [k for k in PHRASINGS if any(s.kind == k for s in scores)]
    onsets = [s.onset_s for s in scores if s.onset_s is not None]
    user = sum(s.user_frames for s in scores)
    audio_scored = bool(scores) and all(s.silent_audio is not None for s in scores)
    out: dict[str, tp.Any] = {
        "cases": len(scores),
        "accuracy": sum(s.correct for s in scores) / len(scores) if scores else 0.0,
        "accuracy_by_kind": {k: sum(s.correct for s in scores if s.kind == k) / sum(s.kind == k for s in scores)
                             for k in kinds},
        "cases_by_kind": {k: sum(s.kind == k for s in scores) for k in kinds},
        "answered_early": sum(s.answered_early for s in scores),
        "user_speech_frames": user,
        "silent_share_text": sum(s.silent_text for s in scores) / user if user else None,
        "silent_share_audio": (sum(s.silent_audio or 0 for s in scores) / user if user else None)
        if audio_scored else None,
        "onset_median_s": _percentile(onsets, 50),
        "onset_p90_s": _percentile(onsets, 90),
        "answered": len(onsets),
        "unanswered": len(scores) - len(onsets),
        "onset_audio_median_s": _percentile([s.onset_audio_s for s in scores if s.onset_audio_s is not None], 50),
    }
    out["targets"] = dict(TARGETS)
    out["meets_targets"] = {
        "accuracy": out["accuracy"] >= TARGETS["accuracy"],
        "silent_share_text": out["silent_share_text"] is not None
        and out["silent_share_text"] >= TARGETS["silent_share_text"],
        "onset_median_s": out["onset_median_s"] is not None and out["onset_median_s"] <= TARGETS["onset_median_s"],
    }
    return out


# --- running a model ---------------------------------------------------------------------------------------------

@dataclass
class CaseRun:
    """Moshi's side of one case."""

    pieces: list[str | None]  # text piece per frame, None for padding
    audio: np.ndarray  # float32 [T], same length as the user's audio


def run_cases(bundle, cases: list[TalkCase], generation: dict, seed: int | None = 0, batch_size: int = 16,
              progress: tp.Callable[[float], None] | None = None) -> list[CaseRun]:
    """Moshi's answers to the cases, `batch_size` recordings per batch (rows are independent: with greedy
    decoding a case's answer does not depend on its batch). Calls progress(cases done, fractional) per step."""
    from ..generation.offline import answer_recordings

    runs: list[CaseRun] = []
    for i in range(0, len(cases), batch_size):
        group = cases[i:i + batch_size]
        wavs = [torch.from_numpy(c.audio)[None] for c in group]
        batch_seed = None if seed is None else seed + i
        answers = answer_recordings(bundle, wavs, generation, batch_seed,
                                    None if progress is None else _batch_progress(progress, i, len(group)))
        for answer in answers:
            pieces = [frame_piece(bundle, int(t)) for t in answer.codes[0].tolist()]
            runs.append(CaseRun(pieces, answer.audio[0].clamp(-1, 1).numpy()))
    return runs


def piece_text(piece: str, is_byte: bool) -> str:
    """The text of a SentencePiece piece: byte-fallback pieces (`<0x31>`) become their ASCII character (other bytes,
    parts of multi-byte characters, are dropped: the domain is English)."""
    if not is_byte:
        return piece
    value = int(piece[1:-1], 16)
    return chr(value) if value < 0x80 else ""


def frame_piece(bundle, token: int) -> str | None:
    """Moshi's text in one frame: None for padding and specials, else the piece's text."""
    piece = bundle.text_piece(token)
    return None if piece is None else piece_text(piece, bool(bundle.tokenizer.is_byte(token)))


def _batch_progress(progress: tp.Callable[[float], None], first: int, size: int) -> tp.Callable[[int, int], None]:
    return lambda done, total: progress(first + size * done / total)


def score_runs(cases: list[TalkCase], runs: list[CaseRun], frame_rate: float, frame_size: int
               ) -> tuple[list[CaseScore], float]:
    """Scores of every case and the audio threshold used (RMS)."""
    rms = [frame_rms(r.audio, frame_size) for r in runs]
    threshold = audio_threshold(rms)
    scores = [score_case(r.pieces, frame_rate, c.question, c.words, c.start, c.end, c.voice,
                         (level > threshold).tolist()) for c, r, level in zip(cases, runs, rms)]
    return scores, threshold


# --- the codec's held-out figures ------------------------------------------------------------------------------

def codec_figures(mimi, data: list[str | Path], max_files: int = 0, seconds: float = 10.0,
                  num_codebooks: int | None = None, progress: bool = False) -> dict[str, float]:
    """The model's Mimi on held-out audio: mean mel distance, STFT distance, SI-SDR, and PESQ / STOI when
    installed (the metrics of `openmoshi eval codec`, openmoshi/eval/codec_metrics.py), at `num_codebooks`
    levels (default: the ones it is loaded with, i.e. the LM's)."""
    from tqdm import tqdm

    from ..audio.io import load_audio
    from ..data.audio_clips import list_audio
    from .codec_metrics import waveform_metrics

    files = list_audio(list(data))[: max_files or None]
    if not files:
        raise ConfigError(f"--codec-data {', '.join(map(str, data))}: no audio files found")
    loaded = mimi.num_codebooks
    levels = num_codebooks or loaded
    if not 1 <= levels <= mimi.total_codebooks:
        raise ConfigError(f"--codec-codebooks must be in 1..{mimi.total_codebooks} for this Mimi, got {levels}")
    sums: dict[str, float] = {}
    device = next(mimi.parameters()).device
    mimi.set_num_codebooks(levels)
    try:
        with torch.inference_mode():
            for path in tqdm(files, desc="codec", unit="file", disable=not progress):
                wav = load_audio(path, mimi.sample_rate).wav
                if seconds:
                    wav = wav[:, : int(seconds * mimi.sample_rate)]
                wav = wav[None].to(device)  # [1, 1, T]
                rec = mimi.decode(mimi.encode(wav))[..., : wav.shape[-1]].float()
                for k, v in waveform_metrics(rec.cpu(), wav.float().cpu(), mimi.sample_rate).items():
                    sums[k] = sums.get(k, 0.0) + v
    finally:
        mimi.set_num_codebooks(loaded)
    out: dict[str, float] = {k: v / len(files) for k, v in sums.items()}
    out["codebooks"] = levels
    out["files"] = len(files)
    return out


# --- everything together -------------------------------------------------------------------------------------

@dataclass
class TalkReport:
    summary: dict
    scores: list[CaseScore]
    settings: dict = field(default_factory=dict)
    codec: dict | None = None

    def to_json(self, examples: int = 8) -> dict:
        return {**self.summary, "examples": [asdict(s) for s in pick_examples(self.scores, examples)],
                "codec": self.codec, "settings": self.settings, "per_case": [asdict(s) for s in self.scores]}


def pick_examples(scores: list[CaseScore], count: int) -> list[CaseScore]:
    """Up to `count` cases, taking kinds in turn (correct and wrong ones alike, in case order)."""
    by_kind: dict[str, list[CaseScore]] = {}
    for s in scores:
        by_kind.setdefault(s.kind, []).append(s)
    out: list[CaseScore] = []
    depth = 0
    while len(out) < count and any(depth < len(v) for v in by_kind.values()):
        out += [v[depth] for v in by_kind.values() if depth < len(v)][: count - len(out)]
        depth += 1
    return out


def check_dialogue_model(bundle) -> None:
    if bundle.config.model_type != "moshi":
        raise ConfigError(f"{bundle.source}: eval talk needs a Moshi dialogue model (model_type 'moshi'), not a "
                          f"{bundle.config.model_type!r} model")


def evaluate_talk(bundle, count: int = 40, seed: int = 0, generation: dict | None = None,
                  voices_from: str | Path | None = None, batch_size: int = 16,
                  progress: tp.Callable[[float], None] | None = None,
                  cases: list[TalkCase] | None = None) -> tuple[TalkReport, list[TalkCase], list[CaseRun]]:
    """Build `count` held-out cases (or use `cases`), run the model over them and score them."""
    check_dialogue_model(bundle)
    if cases is None:
        voices = held_out_voices(voices_from, seed=seed)
        cases = build_cases(eval_questions(count, seed), voices)
    generation = dict(bundle.generation if generation is None else generation)
    runs = run_cases(bundle, cases, generation, seed, batch_size, progress)
    frame_rate = bundle.mimi.frame_rate
    scores, threshold = score_runs(cases, runs, frame_rate, bundle.mimi.frame_size)
    settings = {"seed": seed, "generation": generation, "voices": sorted({c.voice for c in cases}),
                "voices_from": str(voices_from) if voices_from else None, "lead_s": LEAD_S, "tail_s": TAIL_S,
                "audio_threshold_rms": threshold, "audio_rel_db": AUDIO_REL_DB, "audio_floor_db": AUDIO_FLOOR_DB,
                "frame_rate": frame_rate}
    return TalkReport(summarize(scores), scores, settings), cases, runs
