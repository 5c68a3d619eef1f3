"""Mimi codes of training audio: computed on the fly by the frozen codec, or read from precomputed shards.

Shards live in CODES_DIR/<codec key>/ (written by `openmoshi data encode`): the key hashes the codec's config,
weights and number of codebooks, so codes made by another codec are never read by mistake.

    CODES_DIR/mimi-3f2a.../index.json        {"codec": key, "items": {audio path: [shard, name]}, ...}
    CODES_DIR/mimi-3f2a.../shard-00000.safetensors   codes int16 [channels, n_q, frames] per audio file

A dialogue may also have augmented versions of its user channel (`write_user_variants`: gain, noise, reverb,
echo of Moshi, drawn from a seed), stored as "PATH#user-aug-V" -> codes [1, n_q, frames], V = 1..count, so that
training on precomputed codes still hears the user through many rooms and microphones.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..checkpoint import StoredTensor, read_tensor, safetensors_index, save_safetensors
from ..codec import Mimi
from ..errors import CheckpointError
from .sources import AudioItem, DataError, read_channels

INDEX_NAME = "index.json"


def codec_key(mimi: Mimi) -> str:
    """A short fingerprint of a codec: its config, every weight and the number of codebooks used."""
    digest = hashlib.sha256()
    digest.update(json.dumps(mimi.cfg.to_kyutai(), sort_keys=True).encode())
    digest.update(str(mimi.num_codebooks).encode())
    for name, tensor in sorted(mimi.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return f"mimi-{digest.hexdigest()[:16]}"


@torch.no_grad()
def encode_channels(mimi: Mimi, wav: torch.Tensor) -> torch.Tensor:
    """Each channel of wav [C, samples] encoded on its own -> codes long [C, n_q, frames]."""
    device = next(mimi.parameters()).device
    return mimi.encode(wav[:, None].to(device)).cpu()


class CodeShards:
    """Read access to the precomputed codes of one codec in a codes folder."""

    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder = Path(folder) / key
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            others = sorted(p.parent.name for p in Path(folder).glob(f"*/{INDEX_NAME}"))
            hint = (f"it holds codes of other codecs ({', '.join(others)})" if others else "it holds no codes")
            raise DataError(f"{folder} has no codes of this model's codec ({key}): {hint}. Run `openmoshi data "
                            "encode --model MODEL --data DATA --out CODES_DIR` with this model.")
        self.index = json.loads(index_path.read_text())
        self._shard_indexes: dict[str, dict[str, StoredTensor]] = {}  # shard -> where its tensors lie

    def codes(self, item: AudioItem) -> torch.Tensor:
        """The codes of a whole audio file -> long [C, n_q, frames]."""
        entry = self.index["items"].get(str(item.path.resolve()))
        if entry is None:
            raise DataError(f"{item.path} is not in the codes of {self.folder}; re-run `openmoshi data encode` "
                            "on this data")
        return self._load(entry).long()

    def user_variants(self, item: AudioItem) -> int:
        """How many augmented user channels `item` has (0 for none)."""
        key = str(item.path.resolve())
        return self.index.get("user_variants", {}).get(key, 0)

    def codes_with_user_variant(self, item: AudioItem, variant: int) -> torch.Tensor:
        """The dialogue's codes with its user channel replaced by augmented version `variant` (0 = as recorded)
        -> long [2, n_q, frames]."""
        codes = self.codes(item)
        if variant == 0:
            return codes
        entry = self.index["items"].get(variant_key(item.path, variant))
        if entry is None or codes.shape[0] != 2:
            raise DataError(f"{item.path} has no augmented user channel {variant} in {self.folder}; run `openmoshi "
                            "data encode --user-variants N` on this data")
        return torch.cat([codes[:1], self._load(entry).long()])

    def _load(self, entry: list[str]) -> torch.Tensor:
        """One item's codes, read from its shard alone (its bytes; nothing kept but the shards' headers: safetensors'
        own readers kept memory of every shard read, ~0.1 KB per tensor, which grew training by ~0.2 MB a step)."""
        shard, name = entry
        path = self.folder / shard
        try:
            if shard not in self._shard_indexes:
                self._shard_indexes[shard] = safetensors_index(path)
            where = self._shard_indexes[shard][name]
            with open(path, "rb") as f:
                return read_tensor(f, name, where)
        except (OSError, KeyError, CheckpointError) as exc:
            raise DataError(f"cannot read codes {name} from {path} ({exc}); re-run `openmoshi data encode` on "
                            "this data") from exc


def variant_key(path: Path, variant: int) -> str:
    return f"{Path(path).resolve()}#user-aug-{variant}"


class _ShardWriter:
    """Appends codes to a codec's folder: new shards, then the index rewritten (both atomically), so a killed
    run loses at most the shard being filled and a rerun resumes."""

    def __init__(self, folder: Path, key: str, shard_frames: int = 1_000_000) -> None:
        self.out = Path(folder) / key
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / INDEX_NAME
        self.index = json.loads(path.read_text()) if path.is_file() else {"codec": key, "items": {}}
        self.index.setdefault("user_variants", {})
        self.shard_frames = shard_frames
        self.pending: dict[str, torch.Tensor] = {}
        self.names: dict[str, str] = {}
        self.frames = 0
        self.done_variants: dict[str, int] = {}

    def has(self, key: str) -> bool:
        return key in self.index["items"] or key in self.names

    def add(self, key: str, codes: torch.Tensor) -> None:
        name = f"item{len(self.index['items']) + len(self.names)}"
        self.pending[name] = codes.to(torch.int16)
        self.names[key] = name
        self.frames += codes.shape[-1]
        if self.frames >= self.shard_frames:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            shard = f"shard-{len({s for s, _ in self.index['items'].values()}):05d}.safetensors"
            tmp = self.out / f"{shard}.tmp"
            save_safetensors(self.pending, tmp)
            tmp.replace(self.out / shard)
            self.index["items"].update({key: [shard, name] for key, name in self.names.items()})
        self.index["user_variants"].update(self.done_variants)
        tmp_index = self.out / f"{INDEX_NAME}.tmp"
        tmp_index.write_text(json.dumps(self.index, indent=1))
        tmp_index.replace(self.out / INDEX_NAME)
        self.pending, self.names, self.frames, self.done_variants = {}, {}, 0, {}


def write_shards(mimi: Mimi, items: list[AudioItem], folder: str | Path, shard_frames: int = 1_000_000,
                 progress=None) -> Path:
    """Encode every audio file once (whole file, each channel) into shards keyed by the codec; returns the
    codec's folder. Files already encoded with this codec are kept (re-running resumes)."""
    writer = _ShardWriter(Path(folder), codec_key(mimi), shard_frames)
    for item in items:
        path = str(item.path.resolve())
        if not writer.has(path):
            writer.add(path, encode_channels(mimi, read_channels(item.path, sample_rate=mimi.sample_rate)))
        if progress is not None:
            progress(1)
    writer.flush()
    return writer.out


def write_user_variants(mimi: Mimi, items: list[AudioItem], folder: str | Path, count: int, seed: int = 0,
                        augment_cfg=None, shard_frames: int = 1_000_000, progress=None) -> Path:
    """For every stereo dialogue, `count` augmented versions of its user channel (openmoshi.data.augment:
    gain, noise, reverb, echo of Moshi's channel; version V of file F drawn from (seed, F's name, V)), each
    encoded -> "PATH#user-aug-V". Versions already written are kept (re-running resumes; a larger count adds)."""
    from .augment import UserAugmenter
    if count < 1:
        raise DataError(f"the number of augmented user channels must be >= 1, got {count}")
    augmenter = UserAugmenter(augment_cfg, seed=seed)
    writer = _ShardWriter(Path(folder), codec_key(mimi), shard_frames)
    for item in items:
        path = str(item.path.resolve())
        wanted = [v for v in range(1, count + 1) if not writer.has(variant_key(item.path, v))]
        if wanted:
            stereo = read_channels(item.path, sample_rate=mimi.sample_rate)
            if stereo.shape[0] != 2:
                raise DataError(f"{item.path} has {stereo.shape[0]} channel(s): augmented user channels are for "
                                "stereo dialogues (channel 0 = Moshi, channel 1 = the user)")
            base = int.from_bytes(hashlib.sha1(item.path.name.encode()).digest()[:6], "little")
            for v in wanted:
                augmented, _ = augmenter(stereo, index=base * 1_000 + v)
                writer.add(variant_key(item.path, v), encode_channels(mimi, augmented[1:2]))
        writer.done_variants[path] = max(count, writer.index["user_variants"].get(path, 0))
        if progress is not None:
            progress(1)
    writer.flush()
    return writer.out


def stack_channel_codes(folder: str | Path, key: str, files: dict[Path, list[Path]]) -> int:
    """Codes of multi-channel files from the codes of their channels, without running the codec: `files` maps
    a file (e.g. a stereo dialogue) to one file per channel, in order, each already encoded under `key` (e.g. the
    mono files `openmoshi.data.mono.split_dialogues` wrote from it). Channels are encoded independently, so this
    is the file's own encoding (up to float rounding of a batch of one vs two). Returns the files added."""
    shards = CodeShards(folder, key)
    writer = _ShardWriter(Path(folder), key, shard_frames=1 << 62)  # one shard for all
    added = 0
    for target, channels in files.items():
        path = str(Path(target).resolve())
        if writer.has(path):
            continue
        parts = [shards.codes(AudioItem(Path(c), 0.0)) for c in channels]
        if len({p.shape[-1] for p in parts}) != 1:
            raise DataError(f"{target}: its channel files' codes differ in length {[p.shape[-1] for p in parts]}")
        writer.add(path, torch.cat(parts))
        added += 1
    if added:
        writer.flush()
    return added


def frames_of(seconds: float, frame_rate: float) -> int:
    return math.ceil(seconds * frame_rate - 1e-6)
