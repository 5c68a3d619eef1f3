"""Voice bank: one fixed voice for Moshi, many user voices, each user voice in exactly one data split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from .engines import Voice, festival_voices

MOSHI_VOICE = "espeak:en-us+f3:p55:r160:g55"

# English accents of espeak-ng (`en` is British) and its voice variants (m = male, f = female).
ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f4", "f5", "klatt")
SPLITS = ("train", "valid", "test")


@dataclass
class VoiceBank:
    moshi: Voice
    users: dict[str, list[Voice]]  # split -> its user voices (disjoint)

    def all_users(self) -> list[Voice]:
        return [v for split in SPLITS for v in self.users[split]]


def user_voice_pool(count: int, seed: int, engines: tuple[str, ...] = ("espeak", "festival"),
                    exclude: Voice | None = None, accents: tuple[str, ...] = ESPEAK_ACCENTS) -> list[Voice]:
    """`count` distinct user voices drawn from `seed`: espeak-ng accents (or languages) x variants x
    pitch/rate/range, and the installed festival voices x rate (skipped when festival is not installed)."""
    rng = np.random.default_rng([seed, 7001])
    festival = [name for name in festival_voices() if "festival" in engines]
    pool: list[Voice] = []
    keys = {exclude.key} if exclude else set()
    attempts = 0
    while len(pool) < count and attempts < count * 50:
        attempts += 1
        if festival and rng.random() < 0.2:
            voice = Voice("festival", str(rng.choice(festival)), rate=int(rng.integers(140, 195)))
        elif "espeak" in engines:
            name = f"{rng.choice(accents)}+{rng.choice(ESPEAK_VARIANTS)}"
            voice = Voice("espeak", name, pitch=int(rng.integers(25, 80)), rate=int(rng.integers(130, 190)),
                          range=int(rng.integers(30, 85)))
            if exclude is not None and name == exclude.name:
                continue
        else:
            break
        if voice.key not in keys:
            keys.add(voice.key)
            pool.append(voice)
    if len(pool) < count:
        raise ConfigError(f"could only make {len(pool)} distinct user voices with engines {engines}; "
                          "install festival or allow espeak")
    return pool


def make_voice_bank(num_users: int, seed: int, fractions: dict[str, float], moshi: str = MOSHI_VOICE,
                    engines: tuple[str, ...] = ("espeak", "festival"),
                    accents: tuple[str, ...] = ESPEAK_ACCENTS) -> VoiceBank:
    """Split `num_users` voices between train/valid/test in proportion to the dialogue split fractions, at least
    one per split that has a positive fraction, so held-out dialogues are spoken by held-out voices."""
    moshi_voice = Voice.parse(moshi)
    pool = user_voice_pool(num_users, seed, engines, exclude=moshi_voice, accents=accents)
    held = {s: (max(1, round(num_users * fractions[s])) if fractions[s] > 0 else 0) for s in ("valid", "test")}
    if held["valid"] + held["test"] >= num_users:
        raise ConfigError(f"{num_users} user voices cannot be split into train/valid/test; use --user-voices of "
                          f"at least {held['valid'] + held['test'] + 1}")
    users = {"test": pool[:held["test"]], "valid": pool[held["test"]:held["test"] + held["valid"]],
             "train": pool[held["test"] + held["valid"]:]}
    return VoiceBank(moshi_voice, users)
