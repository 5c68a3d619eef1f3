"""Mimi codes of training audio: computed on the fly by the frozen codec, or read from precomputed shards.

Shards live in CODES_DIR/<codec key>/ (written by `openmoshi data encode`): the key hashes the codec's config,
weights and number of codebooks, so codes made by another codec are never read by mistake.

    CODES_DIR/mimi-3f2a.../index.json        {"codec": key, "items": {audio path: [shard, name]}, ...}
    CODES_DIR/mimi-3f2a.../shard-00000.safetensors   codes int16 [channels, n_q, frames] per audio file
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import torch

from ..checkpoint import read_safetensors, save_safetensors
from ..codec import Mimi
from .sources import AudioItem, DataError, read_channels

INDEX_NAME = "index.json"
CACHED_SHARDS = 4  # shards a reader keeps in memory (1M frames x 8 levels of int16: 16 MB each)


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
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # shard -> its codes, LRU

    def codes(self, item: AudioItem) -> torch.Tensor:
        """The codes of a whole audio file -> long [C, n_q, frames]."""
        entry = self.index["items"].get(str(item.path.resolve()))
        if entry is None:
            raise DataError(f"{item.path} is not in the codes of {self.folder}; re-run `openmoshi data encode` "
                            "on this data")
        shard, name = entry
        if shard in self._cache:
            self._cache.move_to_end(shard)
        else:  # a few shards in memory (random items across shards would otherwise reload one at every item)
            while len(self._cache) >= CACHED_SHARDS:
                self._cache.popitem(last=False)
            self._cache[shard] = read_safetensors(self.folder / shard)
        return self._cache[shard][name].long()


def write_shards(mimi: Mimi, items: list[AudioItem], folder: str | Path, shard_frames: int = 1_000_000,
                 progress=None) -> Path:
    """Encode every audio file once (whole file, each channel) into shards keyed by the codec; returns the
    codec's folder. Files already encoded with this codec are kept (re-running resumes)."""
    key = codec_key(mimi)
    out = Path(folder) / key
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"codec": key, "items": {}}
    shard_id = len({s for s, _ in index["items"].values()})
    pending: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    frames = 0

    def flush() -> None:
        nonlocal shard_id, pending, names, frames
        if not pending:
            return
        shard = f"shard-{shard_id:05d}.safetensors"
        tmp = out / f"{shard}.tmp"
        save_safetensors(pending, tmp)
        tmp.replace(out / shard)
        for path, name in names.items():
            index["items"][path] = [shard, name]
        tmp_index = out / f"{INDEX_NAME}.tmp"
        tmp_index.write_text(json.dumps(index, indent=1))
        tmp_index.replace(index_path)
        shard_id, pending, names, frames = shard_id + 1, {}, {}, 0

    for item in items:
        path = str(item.path.resolve())
        if path not in index["items"]:
            codes = encode_channels(mimi, read_channels(item.path, sample_rate=mimi.sample_rate))
            name = f"item{len(index['items']) + len(names)}"
            pending[name] = codes.to(torch.int16)
            names[path] = name
            frames += codes.shape[-1]
            if frames >= shard_frames:
                flush()
        if progress is not None:
            progress(1)
    flush()
    return out


def stack_channel_codes(folder: str | Path, key: str, files: dict[Path, list[Path]]) -> int:
    """Codes of multi-channel files from the codes of their channels, without running the codec: `files` maps
    a file (e.g. a stereo dialogue) to one file per channel, in order, each already encoded under `key` (e.g. the
    mono files `openmoshi.data.mono.split_dialogues` wrote from it). Channels are encoded independently, so this
    is the file's own encoding (up to float rounding of a batch of one vs two). Returns the files added."""
    shards = CodeShards(folder, key)
    out = shards.folder
    index = shards.index
    pending: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for target, channels in files.items():
        path = str(Path(target).resolve())
        if path in index["items"]:
            continue
        parts = [shards.codes(AudioItem(Path(c), 0.0)) for c in channels]
        if len({p.shape[-1] for p in parts}) != 1:
            raise DataError(f"{target}: its channel files' codes differ in length {[p.shape[-1] for p in parts]}")
        name = f"item{len(index['items']) + len(names)}"
        pending[name] = torch.cat(parts).to(torch.int16)
        names[path] = name
    if pending:
        shard = f"shard-{len({s for s, _ in index['items'].values()}):05d}.safetensors"
        tmp = out / f"{shard}.tmp"
        save_safetensors(pending, tmp)
        tmp.replace(out / shard)
        index["items"].update({path: [shard, name] for path, name in names.items()})
        tmp_index = out / f"{INDEX_NAME}.tmp"
        tmp_index.write_text(json.dumps(index, indent=1))
        tmp_index.replace(out / INDEX_NAME)
    return len(pending)


def frames_of(seconds: float, frame_rate: float) -> int:
    return math.ceil(seconds * frame_rate - 1e-6)
