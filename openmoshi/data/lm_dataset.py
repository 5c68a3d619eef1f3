"""LM training samples: token grids [K, T] = text stream + Moshi's codebooks + the user's, one crop each.

    row 0             text (Inner Monologue of the main speaker, or every speaker for mono speech)
    rows 1..dep_q     Moshi's audio: channel 0 of a dialogue, the only channel of mono speech
    rows dep_q+1..    the user's audio: channel 1 of a dialogue; -1 (no input) for mono speech and text

The user's rows are one frame ahead: column t holds the user's frame t + 1 (`user_shift`). That is what
generation feeds: Kyutai's LMGen (and openmoshi's Generator) gives the model the user's frame t at the same
step as Moshi's own tokens of frame t - 1, where a plain teacher-forced forward would give frame t - 1:

    step s of the model          0        1        2        3
    Moshi's tokens fed           init     frame 0  frame 1  frame 2
    user's tokens fed (gen)      init     frame 1  frame 2  frame 3     <- user_shift = 1 reproduces this
    user's tokens fed (shift 0)  init     frame 0  frame 1  frame 2     (moshi-finetune's layout)

Crops are consecutive `duration`-second windows of every file (the last one zero-padded), indexed in manifest
order; the training core draws the order (openmoshi.data.order: seeded, sharded, resumable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..codec import Mimi
from ..lm.config import LMConfig
from .codes import CodeShards, encode_channels, frames_of
from .interleave import NO_TOKEN, InterleaveConfig, text_stream
from .sources import AudioItem, DataError, crop_starts, read_channels, read_text_documents

logger = logging.getLogger(__name__)

# augment(user [1, samples], moshi [1, samples], sample_rate, generator) -> user [1, samples]
UserAugment = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], torch.Tensor]


class AudioLMDataset:
    """Crops of aligned audio (dialogues or mono speech) as token grids long [1 + n_q, frames]."""

    def __init__(self, items: list[AudioItem], cfg: LMConfig, tokenizer, duration: float,
                 interleave: InterleaveConfig | None = None, mimi: Mimi | None = None,
                 shards: CodeShards | None = None, user_augment: UserAugment | None = None,
                 frame_rate: float = 12.5, sample_rate: int = 24_000, seed: int = 0, user_shift: int = 1,
                 user_variants: bool = False) -> None:
        if mimi is None and shards is None:
            raise DataError("audio data needs a codec (the model's Mimi) or precomputed codes")
        if mimi is not None and mimi.num_codebooks < max(cfg.dep_q, cfg.n_user):
            raise DataError(f"the codec gives {mimi.num_codebooks} codebooks, the LM needs "
                            f"{max(cfg.dep_q, cfg.n_user)} per channel")
        self.items, self.cfg, self.tokenizer, self.duration = items, cfg, tokenizer, duration
        self.interleave = interleave or InterleaveConfig(
            frame_rate=frame_rate, pad_id=cfg.existing_text_padding_id, epad_id=cfg.existing_text_end_padding_id)
        self.mimi, self.shards, self.user_augment, self.seed = mimi, shards, user_augment, seed
        self.user_variants = user_variants  # draw one of the precomputed augmented user channels per item
        self.frame_rate, self.sample_rate = frame_rate, sample_rate
        if user_shift < 0:
            raise DataError(f"user_shift must be >= 0, got {user_shift}")
        self.user_shift = user_shift
        self.frames = frames_of(duration, frame_rate)
        self.crops = [(i, start) for i, item in enumerate(items) for start in crop_starts(item.duration, duration)]
        self._words: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self.crops)

    def _audio_codes(self, item: AudioItem, start: float, gen: torch.Generator) -> torch.Tensor:
        """Codes from the crop's first frame, long [C, n_q_codec, frames + user_shift] (C = 1 mono, 2 dialogue)."""
        length = self.frames + self.user_shift
        if self.shards is not None:
            codes = self.shards.codes(item)
            if self.user_variants and codes.shape[0] == 2:
                count = self.shards.user_variants(item)
                if not count:
                    raise DataError(f"{item.path} has no augmented user channels in {self.shards.folder}: run "
                                    "`openmoshi data encode --user-variants N` on this data, or train without "
                                    "data.augment_user")
                variant = int(torch.randint(count + 1, (), generator=gen))  # 0 = the user as recorded
                codes = self.shards.codes_with_user_variant(item, variant)
            first = round(start * self.frame_rate)
            codes = codes[..., first:first + length]
            return torch.nn.functional.pad(codes, (0, length - codes.shape[-1]), value=NO_TOKEN)
        assert self.mimi is not None
        wav = read_channels(item.path, start, length / self.frame_rate, self.sample_rate)
        if wav.shape[0] >= 2 and self.user_augment is not None:
            wav = torch.cat([wav[:1], self.user_augment(wav[1:2], wav[:1], self.sample_rate, gen), wav[2:]])
        return encode_channels(self.mimi, wav)[..., :length]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.item(index)

    def item(self, index: int, interleave: InterleaveConfig | None = None,
             gen: torch.Generator | None = None) -> torch.Tensor:
        """Crop `index` as a token grid; `interleave` overrides the stream settings (e.g. a jittered delay),
        `gen` drives the user augmentation (default: seeded by the crop index)."""
        cfg = self.cfg
        item_index, start = self.crops[index]
        item = self.items[item_index]
        gen = gen or torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        codes = self._audio_codes(item, start, gen)
        if codes.shape[0] > 2:
            raise DataError(f"{item.path} has {codes.shape[0]} channels: expected mono speech or a stereo "
                            "dialogue (channel 0 = Moshi, channel 1 = the user)")
        dialogue = codes.shape[0] == 2
        if item_index not in self._words:
            self._words = {item_index: item.words()}  # the alignments of the file being cropped
        text = text_stream(self._words[item_index], self.tokenizer, start, self.frames,
                           interleave or self.interleave, speakers="main" if dialogue else "all")
        grid = torch.full((cfg.num_codebooks, self.frames), NO_TOKEN, dtype=torch.long)
        grid[0] = torch.tensor(text)
        grid[1:1 + cfg.dep_q] = codes[0, : cfg.dep_q, : self.frames]
        if dialogue and cfg.n_user:
            grid[1 + cfg.dep_q:] = codes[1, : cfg.n_user, self.user_shift:self.user_shift + self.frames]
        return grid


    def other_text(self, index: int, interleave: InterleaveConfig) -> torch.Tensor:
        """The other speakers' text stream of dialogue crop `index` on the crop's frames, long [frames]: the
        target of the auxiliary transcription of the user."""
        item_index, start = self.crops[index]
        item = self.items[item_index]
        if item_index not in self._words:
            self._words = {item_index: item.words()}
        return torch.tensor(text_stream(self._words[item_index], self.tokenizer, start, self.frames, interleave,
                                        speakers="other"))


class TextLMDataset:
    """A text corpus as token grids long [1 + n_q, frames]: one text token per frame, no audio (-1).

    Documents are tokenized, each followed by EOS, concatenated, and cut into consecutive windows."""

    def __init__(self, documents: list[str], cfg: LMConfig, tokenizer, frames: int) -> None:
        tokens: list[int] = []
        eos = tokenizer.eos_id()
        for doc in documents:
            tokens.extend(tokenizer.encode(doc))
            if eos >= 0:
                tokens.append(eos)
        if len(tokens) < 2:
            raise DataError("the text corpus tokenizes to fewer than 2 tokens")
        self.cfg, self.frames = cfg, frames
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.count = max(1, len(tokens) // frames)
        self.bytes_per_token = sum(len(d.encode()) for d in documents) / len(tokens)

    @classmethod
    def from_path(cls, path, cfg: LMConfig, tokenizer, frames: int) -> TextLMDataset:
        return cls(read_text_documents(path), cfg, tokenizer, frames)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        grid = torch.full((self.cfg.num_codebooks, self.frames), NO_TOKEN, dtype=torch.long)
        chunk = self.tokens[index * self.frames:(index + 1) * self.frames]
        grid[0, : len(chunk)] = chunk
        return grid
