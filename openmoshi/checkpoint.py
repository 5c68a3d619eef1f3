"""Checkpoint I/O in Kyutai's layout: finding files (local or `hf://`), reading safetensors, key conventions.

Kyutai's loader accepts several spellings of the attention weights; we normalise them all to the stacked
form of the released files (`self_attn.in_proj_weight`, `self_attn.out_proj.weight`), which is also what
our modules hold and what we save.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import BinaryIO, NamedTuple
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"


def hf_download(repo: str, filename: str, revision: str | None = None) -> Path:
    """Fetch one file of a Hugging Face repo through the local cache, with an actionable error offline."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed for hf:// sources: pip install huggingface_hub") from exc
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as exc:  # the hub raises many types: offline, not found, gated, ...
        kind = type(exc).__name__
        if "EntryNotFound" in kind and "Local" not in kind:
            raise FileNotFoundError(f"{filename} is not in the Hugging Face repo {repo}") from exc
        raise CheckpointError(
            f"could not get {filename} from the Hugging Face repo {repo} ({kind}: {exc}). If this machine is "
            f"offline, download the repo elsewhere (huggingface-cli download {repo}) and pass the local folder, "
            "or set HF_HUB_OFFLINE=1 to use files already in the cache.") from exc


def split_hf(source: str) -> tuple[str, str | None]:
    """'hf://owner/repo[/file]' -> ('owner/repo', 'file' or None)."""
    parts = source[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2:
        raise CheckpointError(f"{source!r} is not of the form hf://owner/repo[/file]")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def read_safetensors(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     mapped: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (mapped from the file where possible).

    With `dtype`, floating-point tensors stored in another dtype are read and cast one at a time, so memory
    holds the cast weights plus one tensor, never the whole file beside them (e.g. bf16 -> fp32).
    `mapped` (CPU): tensors not cast are views of a mapping of the file (no copy; pages read stay resident
    while the mapping lives, even those of tensors dropped since); False: copies of the process's own, the
    file unmapped (a model that replaces some of its weights, as quantizing Mimi does).
    For a model, read once. Code reading tensors again and again (a training data path) uses
    `safetensors_index` + `read_tensor`: safetensors 0.8's readers keep ~0.1 KB per tensor of every call.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if dtype is not None:
        header = _read_header(path)
        codes = {v["dtype"] for k, v in header.items() if not k.startswith("__")}
        if any(_FROM_ST.get(c, torch.uint8).is_floating_point and _FROM_ST.get(c) != dtype for c in codes):
            return _read_cast(path, dtype, torch.device(device))
    try:
        if not mapped:
            from safetensors import safe_open
            with safe_open(str(path), "pt", device=str(device)) as f:
                return {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (not a dict)
        from safetensors.torch import load_file
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


_ST_DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
              torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {code: dtype for dtype, code in _ST_DTYPES.items()}


def _read_header(path: Path) -> dict:
    import json
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= os.path.getsize(path) - 8:
                raise ValueError(f"header size {size} does not fit the file")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    header["__data_start__"] = 8 + size
    return header


class StoredTensor(NamedTuple):
    """Where one tensor of a safetensors file lies: its dtype, shape and byte range in the file."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def safetensors_index(path: str | Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file (absolute byte ranges), each checked: a known dtype, as many bytes as
    its shape needs. What `read_tensor` reads by."""
    header = _read_header(Path(path))
    start = header.pop("__data_start__")
    header.pop("__metadata__", None)
    size = os.path.getsize(path)
    index = {}
    for key, info in header.items():
        dtype = _FROM_ST.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has dtype {info['dtype']}, which openmoshi cannot read")
        begin, end = info["data_offsets"]
        if end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key} has {end - begin} bytes for shape {info['shape']}")
        if start + end > size:
            raise CheckpointError(f"{path} ends before the end of tensor {key} (the file is truncated)")
        index[key] = StoredTensor(dtype, tuple(info["shape"]), start + begin, start + end)
    return index


def read_tensor(f: BinaryIO, key: str, where: StoredTensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor `key` of the safetensors file open as `f`, read with plain reads (no mapping, nothing kept) into
    `buffer` (uint8, large enough; default a new one) -> a view of it."""
    size = where.end - where.begin
    raw = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer[:size]
    f.seek(where.begin)
    if f.readinto(memoryview(raw.numpy())) != size:
        raise CheckpointError(f"{f.name} ends before the end of tensor {key} (the file is truncated)")
    return raw.view(where.dtype).reshape(where.shape)


def stored_float_dtype(path: str | Path) -> torch.dtype | None:
    """The floating-point dtype most tensors of a safetensors file are stored in (None: no float tensors)."""
    counts: dict[torch.dtype, int] = {}
    for key, info in _read_header(Path(path)).items():
        dtype = None if key.startswith("__") else _FROM_ST.get(info["dtype"])
        if dtype is not None and dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _read_cast(path: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Reads the file tensor by tensor (plain reads into one reused buffer), casting floating-point ones."""
    index = safetensors_index(path)
    buffer = torch.empty(max([w.end - w.begin for w in index.values()] + [8]), dtype=torch.uint8)
    out = {}
    with open(path, "rb") as f:
        for key, info in index.items():
            value = read_tensor(f, key, info, buffer)
            value = value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value.clone()
            out[key] = value.to(device)
    return out


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                     ) -> None:
    """Write a safetensors file one tensor at a time (no second copy of the whole state is ever built).

    `state` may be a lazy mapping: each value is read once, written, and dropped (see write_safetensors).
    """
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    write_safetensors(path, specs, lambda key: state[key], metadata)


def write_safetensors(path: str | Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensor: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from each tensor's dtype and shape and a function giving its value on demand."""
    import json
    for key, (dtype, _) in specs.items():
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot write {key}: dtype {dtype} has no safetensors code")
    # the safetensors package's order (wider dtypes first, then by name): every tensor stays aligned to its
    # element size and the file is byte for byte what safetensors.torch.save_file writes
    order = list(_ST_DTYPES.values())
    specs = dict(sorted(specs.items(), key=lambda item: (order.index(_ST_DTYPES[item[1][0]]), item[0])))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # into a new file, renamed at the end: tensors being written may be mapped from the file being replaced
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key, (dtype, shape) in specs.items():
                value = tensor(key).detach().to("cpu").contiguous()
                if value.dtype != dtype or tuple(value.shape) != shape:
                    raise CheckpointError(f"cannot write {key}: got {value.dtype} {tuple(value.shape)}, "
                                          f"announced {dtype} {shape}")
                if value.numel():
                    f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


_PER_STEP = re.compile(r"^(.*\.(?:self_attn|cross_attention)\.)(in_projs|out_projs)\.(\d+)\.weight$")


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map every accepted attention-key spelling to the stacked one; other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    per_step: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PER_STEP.match(key)
        if match:
            prefix, kind, index = match.groups()
            target = prefix + ("in_proj_weight" if kind == "in_projs" else "out_proj.weight")
            per_step.setdefault(target, {})[int(index)] = value
        elif key.endswith((".self_attn.in_proj.weight", ".cross_attention.in_proj.weight")):
            out[key[: -len("in_proj.weight")] + "in_proj_weight"] = value
        else:
            out[key] = value
    for target, parts in per_step.items():
        if sorted(parts) != list(range(len(parts))):
            raise CheckpointError(f"per-step weights for {target} are missing steps: have {sorted(parts)}")
        out[target] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
              dtype: torch.dtype | None = None, assign: bool = False, ignore: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, failing with the key and file named on any missing, extra or misshaped tensor.

    Floating-point tensors are cast to `dtype` (or to the parameter's dtype). With `assign=True` the
    tensors replace the parameters (no second copy; for modules built on the meta device).
    """
    state = normalize_keys(state)
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state and not k.startswith(ignore)]
    extra = [k for k in state if k not in expected and not k.startswith(ignore)]
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} tensor(s), first: {missing[:5]}")
        if extra:
            lines.append(f"unexpected {len(extra)} tensor(s), first: {extra[:5]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(lines))
    converted: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key not in state:
            continue
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
        if target.dtype.is_floating_point and not value.dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {key} is {value.dtype}, the model expects floating-point "
                                  "weights; the file is corrupt or not a checkpoint of this model")
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key} holds {bad} non-finite value(s) (NaN or inf); "
                                  "the checkpoint is corrupt (a diverged training run?)")
        if value.dtype.is_floating_point:
            value = value.to(dtype or (target.dtype if target.dtype.is_floating_point else value.dtype))
        elif target.dtype != value.dtype:
            value = value.to(target.dtype)
        converted[key] = value
    module.load_state_dict(converted, strict=not ignore, assign=assign)


class ModelSource:
    """A model in Kyutai's layout: a local folder or `hf://owner/repo`, files fetched on demand."""

    def __init__(self, source: str | Path, revision: str | None = None) -> None:
        text = str(source)
        self.revision = revision
        if text.startswith(HF_PREFIX):
            self.repo, sub = split_hf(text)
            if sub:
                raise CheckpointError(f"{source!r} names a file; a model source is a folder or hf://owner/repo")
            self.folder = None
        else:
            self.repo = None
            self.folder = Path(source).expanduser()
            if not self.folder.is_dir():
                raise CheckpointError(f"model folder not found: {self.folder}")
        self.name = text

    def has(self, filename: str) -> bool:
        if self.folder is not None:
            return (self.folder / filename).is_file()
        try:
            self.get(filename)
            return True
        except FileNotFoundError:
            return False

    @classmethod
    def around(cls, source: str | Path) -> ModelSource:
        """The model holding `source`: itself (folder, hf://owner/repo), its repo (hf://owner/repo/file) or the
        folder of a local file (a bare weights file or config.json)."""
        text = str(source)
        if text.startswith(HF_PREFIX):
            repo, _ = split_hf(text)
            return cls(HF_PREFIX + repo)
        path = Path(text).expanduser()
        return cls(path.parent if path.is_file() else path)

    def get(self, filename: str) -> Path:
        """Local path of `filename` (downloaded through the HF cache for hf:// sources).

        A name that is itself `hf://owner/repo/file` (allowed in Kyutai's config.json) is fetched from there.
        """
        if filename.startswith(HF_PREFIX):
            repo, name = split_hf(filename)
            if not name:
                raise CheckpointError(f"{filename} names a repo, not a file")
            return hf_download(repo, name, self.revision)
        if self.folder is not None:
            path = self.folder / filename
            if not path.is_file():
                raise FileNotFoundError(f"model folder {self.folder} has no file {filename}")
            return path
        assert self.repo is not None
        return hf_download(self.repo, filename, self.revision)

    def require(self, filename: str, what: str) -> Path:
        try:
            return self.get(filename)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.name}: the {what} file {filename} is missing ({exc})") from exc

    def config(self) -> dict | None:
        """config.json as a dict, or None when the source has none (legacy 7B repos)."""
        if not self.has("config.json"):
            return None
        import json
        path = self.get("config.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
