"""Stereo dialogues -> mono speech: each channel becomes its own file with only its speaker's words.

Audio pretraining (and codec training) want single-speaker speech with word alignments; a dialogue set already
holds it, one speaker per channel (channel 0 = Moshi / SPEAKER_MAIN, channel 1 = the user).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .format import DataFormatError, read_alignments, read_manifest, write_alignments, write_manifest

CHANNEL_SPEAKERS = ("SPEAKER_MAIN", "SPEAKER_USER")  # channel 0, channel 1


def split_dialogues(manifest: Path, out_dir: Path) -> Path:
    """Write OUT/NAME.ch0.wav / NAME.ch1.wav (+ their NAME.chK.json alignments) for every stereo dialogue of
    `manifest` and OUT/mono.jsonl listing them. Files already written are kept (a rerun resumes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for wav_path, _ in read_manifest(Path(manifest)):
        words = read_alignments(wav_path.with_suffix(".json"))
        info = sf.info(str(wav_path))
        if info.channels != 2:
            raise DataFormatError(f"{wav_path}: {info.channels} channel(s); a dialogue is stereo (Moshi left, user "
                                  "right)")
        duration = info.frames / info.samplerate
        targets = [out_dir / f"{wav_path.stem}.ch{c}.wav" for c in range(2)]
        if not all(t.exists() and t.with_suffix(".json").exists() for t in targets):
            audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)
            for c, target in enumerate(targets):
                mine = [w for w in words if w.speaker == CHANNEL_SPEAKERS[c]]
                tmp = target.with_name(f".{target.name}.tmp.wav")
                sf.write(str(tmp), np.ascontiguousarray(audio[:, c]), rate, subtype="PCM_16")
                tmp.replace(target)
                write_alignments(target.with_suffix(".json"), mine)
        entries += [(t.name, duration) for t in targets]
    path = out_dir / "mono.jsonl"
    write_manifest(path, entries)
    return path
