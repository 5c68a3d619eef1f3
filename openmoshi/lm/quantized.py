"""Moshi LMs with int8 / int4 weights: quantize on load (layer by layer), save, and load quantized folders.

A quantized folder is a Kyutai model folder whose LM file holds, for each linear weight, the tensors of
nn/quant.py under the checkpoint's key names:

    transformer.layers.0.self_attn.in_proj_weight      int8 [N, K]         (int4: uint8 [N, K / 2])
    transformer.layers.0.self_attn.in_proj_weight_scb  float32 [N]         (int4: ..._scale [N, K / 32])
    transformer.layers.0.gating.linear_in.weight       int8 ...
    transformer.layers.0.gating.linear_in.weight_scb   float32 ...

config.json marks it: int8 with Kyutai's own `"quantize": true` (the layout of kyutai/moshiko-pytorch-q8, so
such a folder also loads in Kyutai's package on GPU), int4 with `"quantization": {"bits": 4, "group_size": 32,
"scheme": "symmetric"}` (scales only) or `"scheme": "asymmetric"` (scales and `..._zero` tensors; a folder
without "scheme", written before the symmetric format, is asymmetric). Loading assigns the tensors as they are
read: nothing is quantized again.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import ModelSource, read_tensor, safetensors_index, save_safetensors, write_safetensors
from ..errors import CheckpointError, ConfigError
from ..nn.quant import INT4_GROUP, INT4_SCHEMES, QuantizedLinear, check_bits, quantize_modules_
from .config import LMConfig
from .loading import CONFIG_NAME, _weights_path, load_lm, read_config
from .model import LMModel, TokenEmbedding, drop_pages

logger = logging.getLogger(__name__)

_QUANT_SUFFIXES = ("_scb", "_scale", "_zero")
_PER_STEP = re.compile(r"^(.*\.self_attn\.)(in_projs|out_projs)\.(\d+)\.(weight(?:_scb|_scale|_zero)?)$")


def stored_bits(cfg: LMConfig) -> int | None:
    """Bit width of the weights a config describes (None: float weights)."""
    if cfg.quantization:
        bits = cfg.quantization.get("bits")
        if bits not in (4, 8):
            raise ConfigError(f"config.json: quantization bits {bits!r} is not 8 or 4")
        return int(bits)
    return 8 if cfg.quantize else None


def stored_symmetric(cfg: LMConfig) -> bool:
    """Whether a config's int4 weights are the symmetric format (no "scheme": an older, asymmetric folder)."""
    scheme = (cfg.quantization or {}).get("scheme", "asymmetric")
    if scheme not in INT4_SCHEMES:
        raise ConfigError(f"config.json: int4 quantization scheme {scheme!r} is not one of "
                          f"{', '.join(INT4_SCHEMES)}")
    return scheme == "symmetric"


def quantization_config(bits: int, group_size: int = INT4_GROUP, symmetric: bool = True) -> dict:
    """The config.json fields marking a folder quantized to `bits`."""
    if check_bits(bits) == 8:
        return {"quantize": True, "quantization": {}}
    return {"quantize": False, "quantization": {"bits": 4, "group_size": group_size,
                                                "scheme": INT4_SCHEMES[0 if symmetric else 1]}}


def quantize_lm_(lm: LMModel, bits: int, group_size: int = INT4_GROUP, symmetric: bool = True) -> list[str]:
    """Quantize every linear layer of the LM in place (temporal + depth transformers, projections, heads);
    `symmetric`: the int4 format (nn/quant.py)."""
    names = quantize_modules_(lm, bits, group_size, symmetric=symmetric)
    lm.cfg = lm.cfg.replace(**quantization_config(bits, group_size, symmetric))
    return names


# ---- key names: module state dict <-> checkpoint (Kyutai's spelling of the attention input projection)

def _to_file_key(key: str) -> str:
    head, sep, tail = key.rpartition(".self_attn.in_proj.")
    return f"{head}.self_attn.in_proj_{tail}" if sep else key


def quantized_state_dict(lm: LMModel) -> dict[str, torch.Tensor]:
    return {_to_file_key(k): v for k, v in lm.state_dict().items()}


class _LazyCheckpoint:
    """Tensors of a safetensors file by module key (any accepted spelling), read one at a time.

    Each tensor is read into its own memory with a plain file read, not through a mapping of the whole file:
    pages of a mapped file stay resident (and count as the process's RAM) until the kernel needs them back,
    so streaming a 15 GB checkpoint through a mapping would look like 15 GB of RAM.
    """

    def __init__(self, path: Path) -> None:
        self.mapping: mmap.mmap | None = None
        self.mapped_ptrs: set[int] = set()
        self.entries = safetensors_index(path)
        self.file = open(path, "rb")  # noqa: SIM115 (held for reads until close())
        self.sources: dict[str, list[str]] = {}
        per_step: dict[str, dict[int, str]] = {}
        for key in self.entries:
            match = _PER_STEP.match(key)
            if match:
                prefix, kind, index, leaf = match.groups()
                target = prefix + ("in_proj_" if kind == "in_projs" else "out_proj.") + leaf
                per_step.setdefault(target, {})[int(index)] = key
            else:
                self.sources[_to_file_key(key)] = [key]
        for target, parts in per_step.items():
            if sorted(parts) != list(range(len(parts))):
                raise CheckpointError(f"{path}: per-step weights for {target} are missing steps")
            self.sources[target] = [parts[i] for i in range(len(parts))]

    def __contains__(self, key: str) -> bool:
        return _to_file_key(key) in self.sources

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[self.sources[_to_file_key(key)][0]].dtype

    def mapped(self, key: str) -> torch.Tensor | None:
        """The tensor as a copy-on-write mapping of the file (its pages are read when touched), or None when
        it is not one stored tensor."""
        names = self.sources[_to_file_key(key)]
        where = self.entries[names[0]]
        if len(names) != 1 or where.end == where.begin or where.begin % where.dtype.itemsize:
            return None
        if self.mapping is None:
            self.mapping = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_COPY)
        out = torch.frombuffer(self.mapping, dtype=where.dtype, count=math.prod(where.shape),
                               offset=where.begin).view(where.shape)  # keeps the mapping alive
        self.mapped_ptrs.add(out.data_ptr())
        return out

    def close(self) -> None:
        self.file.close()  # a mapping stays valid while tensors use it

    def get(self, key: str) -> torch.Tensor:
        parts = [read_tensor(self.file, k, self.entries[k]) for k in self.sources[_to_file_key(key)]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def _assign(lm: LMModel, tensors: Callable[[str, torch.Tensor], torch.Tensor], source: Path,
            dtype: torch.dtype, device: str | torch.device, build_kernels: bool = False) -> None:
    """Replace every (meta) parameter and buffer of `lm` by tensors(key, target); `build_kernels`: int4
    layers build their CPU kernels (and drop their stored copy) as soon as their tensors are assigned."""
    built = 0
    for key, target in list(lm.state_dict(keep_vars=True).items()):
        module_name, _, leaf = key.rpartition(".")
        module = lm.get_submodule(module_name)
        value = tensors(key, target)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: tensor {_to_file_key(key)} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
        if (build_kernels and isinstance(module, QuantizedLinear) and module.bits == 4
                and not any(module._buffers[name].is_meta for name in module.stored_names())):
            module.kernels()  # as soon as its tensors are in: its stored copy is freed before the next is read
            built += 1
            if built % 16 == 0:  # the freed copies lie between live tensors: give their pages back as we go
                release_freed_memory()
    for name, buffer in list(lm.named_buffers()):  # non-persistent ones (QuantizedLinear.activation_like)
        if buffer.is_meta:
            module_name, _, leaf = name.rpartition(".")
            lm.get_submodule(module_name)._buffers[leaf] = torch.empty(buffer.shape, dtype=dtype, device=device)


def load_quantized_lm(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      quantize: int | None = None, group_size: int = INT4_GROUP,
                      build_kernels: bool = True, symmetric: bool = True) -> LMModel:
    """Load an LM with quantized linear layers, in eval mode.

    A quantized folder loads as stored (read tensor by tensor, no re-quantization); `quantize` must then be
    None or its bit width. A float checkpoint is quantized to `quantize` bits while it is read, one weight at
    a time, so the float model is never whole in memory (Moshi 7B int4 fits a laptop). Embedding tables
    stored in a narrower float dtype than `dtype` stay so (their rows are widened exactly when looked up); on
    CPU such tables are mapped from the file, not read (TokenEmbedding.mapped: no RAM of their own).
    `build_kernels`: convert int4 weights to the CPU kernels' layout now, one layer at a time (each then
    holds only that copy); False to write the model out instead of running it (openmoshi quantize).
    `symmetric`: the int4 format when quantizing here (a quantized folder loads in its own).
    """
    cfg, _ = read_config(source)
    bits = stored_bits(cfg)
    if quantize is not None:
        check_bits(quantize)
        if bits is not None and bits != quantize:
            raise ConfigError(f"{source} holds int{bits} weights, so it cannot be loaded as int{quantize}; "
                              f"quantize the float model with --bits {quantize} instead")
    if bits is None and quantize is None:
        return load_lm(source, device=device, dtype=dtype)
    if cfg.lora:
        if bits is not None:
            raise ConfigError(f"{source}: LoRA weights cannot be fused into quantized weights; quantize the "
                              "model after fusing the LoRA (openmoshi quantize on the float model)")
        lm = load_lm(source, device=device, dtype=dtype)
        quantize_lm_(lm, int(quantize), symmetric=symmetric)
        return lm
    weights = _weights_path(source, cfg)
    checkpoint = _LazyCheckpoint(weights)
    try:
        lm = _load_into_meta_lm(cfg, bits, quantize, checkpoint, weights, device, dtype, group_size, symmetric,
                                build_kernels and torch.device(device).type == "cpu")
    finally:
        checkpoint.close()
    if build_kernels and torch.device(device).type == "cpu":
        release_freed_memory()
    return lm


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc): the stored copies freed while the kernels
    were built lie between live tensors, where the heap cannot shrink on its own (~1 GB for Moshi 7B)."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


_Tensors = Callable[[str, torch.Tensor], torch.Tensor]


def _plan(cfg: LMConfig, bits: int | None, quantize: int | None, checkpoint: _LazyCheckpoint, weights: Path,
          device: str | torch.device, dtype: torch.dtype, group_size: int, symmetric: bool,
          map_tables: bool = False) -> tuple[LMModel, _Tensors, Callable[[str, torch.dtype], torch.dtype]]:
    """The quantized LM's structure on the meta device, tensors(key, meta target) giving each of its tensors
    from the checkpoint (quantizing float weights on first request), and the dtype a float tensor gets.
    `map_tables` (CPU): embedding tables kept in their stored dtype are mappings of the file, not read."""
    with torch.device("meta"):
        lm = LMModel(cfg)
    tables = {f"{name}.weight" for name, module in lm.named_modules() if isinstance(module, TokenEmbedding)}

    def float_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        """`dtype`, but embedding tables stored narrower (a bf16 checkpoint's) stay as stored: their rows are
        widened when looked up, which gives the same values (TokenEmbedding.row_dtype)."""
        return stored if key in tables and stored.is_floating_point and stored.itemsize < dtype.itemsize else dtype

    def as_float(key: str, value: torch.Tensor) -> torch.Tensor:
        return value.to(device=device, dtype=float_dtype(key, value.dtype))

    def read(key: str) -> torch.Tensor:
        if map_tables and key in tables:
            stored = checkpoint.dtype(key)
            mapped = checkpoint.mapped(key) if float_dtype(key, stored) == stored else None
            if mapped is not None:
                return mapped
        return checkpoint.get(key)
    if bits is not None:
        if bits == 4:
            group_size = int(cfg.quantization.get("group_size", INT4_GROUP))
            symmetric = stored_symmetric(cfg)
            zeros = any(k.endswith("_zero") for k in checkpoint.sources)
            if zeros == symmetric:
                said = INT4_SCHEMES[0 if symmetric else 1]
                held = "zeros (the asymmetric format)" if zeros else "no zeros (the symmetric format)"
                raise CheckpointError(f"{weights}: config.json says {said} int4 weights but the file holds "
                                      f"{held}; the folder is inconsistent, write it again with openmoshi quantize")
        suffix = "_scb" if bits == 8 else "_scale"
        found = {b for b, sfx in ((8, "_scb"), (4, "_scale")) if any(k.endswith(sfx) for k in checkpoint.sources)}
        if found != {bits}:
            held = " and ".join(f"int{b}" for b in sorted(found)) or "float"
            raise CheckpointError(f"{weights}: config.json says int{bits} weights but the file holds {held} "
                                  "weights; the folder is inconsistent, write it again with openmoshi quantize")

        def stored_quantized(name: str) -> bool:
            return f"{name}.weight{suffix}" in checkpoint

        quantize_modules_(lm, bits, group_size, skip=lambda name: not stored_quantized(name), symmetric=symmetric)
        if bits == 4:  # the scheme spelled out (a folder from before the symmetric format has none)
            lm.cfg = cfg.replace(**quantization_config(bits, group_size, symmetric))
        _check_quantized_dtypes(lm, checkpoint, weights, bits)

        def tensor(key: str, target: torch.Tensor) -> torch.Tensor:
            if key not in checkpoint:
                raise CheckpointError(f"{weights} does not match the model: tensor {_to_file_key(key)} is "
                                      f"missing (a int{bits} checkpoint written by another model?)")
            value = read(key)
            if value.dtype.is_floating_point and not key.endswith(("_scale", "_zero")):  # bf16 as stored
                return as_float(key, value)
            return value.to(device)
    else:
        assert quantize is not None
        bits = quantize
        quantize_modules_(lm, bits, group_size, symmetric=symmetric)
        quantized = {name: module for name, module in lm.named_modules() if isinstance(module, QuantizedLinear)}
        pending: dict[str, dict[str, torch.Tensor | None]] = {}

        def tensor(key: str, target: torch.Tensor) -> torch.Tensor:
            module_name, _, leaf = key.rpartition(".")
            layer = quantized.get(module_name)
            if layer is not None and leaf != "bias":
                return _quantized_tensor(layer, module_name, leaf, checkpoint, weights, device, group_size,
                                         pending)
            if key not in checkpoint:
                raise CheckpointError(f"{weights} does not match the model: tensor {key} is missing")
            return as_float(key, read(key))
        lm.cfg = cfg.replace(**quantization_config(bits, group_size, symmetric))
    extra = sorted(set(checkpoint.sources) - {_to_file_key(k) for k in lm.state_dict()})
    if extra:
        raise CheckpointError(f"{weights} does not match the model: unexpected tensor(s) {extra[:5]}")
    return lm, tensor, float_dtype


def _load_into_meta_lm(cfg: LMConfig, bits: int | None, quantize: int | None, checkpoint: _LazyCheckpoint,
                       weights: Path, device: str | torch.device, dtype: torch.dtype, group_size: int,
                       symmetric: bool, build_kernels: bool) -> LMModel:
    lm, tensor, _ = _plan(cfg, bits, quantize, checkpoint, weights, device, dtype, group_size, symmetric,
                          map_tables=build_kernels and cfg.model_type != "hibiki")
    _assign(lm, tensor, weights, dtype, device, build_kernels)
    for module in lm.modules():
        if isinstance(module, TokenEmbedding) and module.weight.dtype != dtype:
            module.row_dtype = dtype
        if isinstance(module, TokenEmbedding) and module.weight.data_ptr() in checkpoint.mapped_ptrs:
            module.mapped = module.weight.data_ptr()
            drop_pages(module.weight)
    if cfg.model_type == "hibiki":  # as in load_lm: read EOS as PAD
        with torch.no_grad():
            lm.text_emb.weight[2] = lm.text_emb.weight[3]
    return lm.eval()


def _quantized_tensor(layer: QuantizedLinear, name: str, leaf: str, checkpoint: _LazyCheckpoint, source: Path,
                      device: str | torch.device, group_size: int,
                      pending: dict[str, dict[str, torch.Tensor | None]]) -> torch.Tensor:
    """One buffer of `layer`, quantizing its float weight from the checkpoint on first request.

    The other buffers wait in `pending`, but for the packed weight when a scale is asked first (the writer's
    order: every bf16 tensor before the uint8 ones): it is quantized again when asked, rather than every
    layer's packed weight being held until then (Moshi 7B: 3.7 GB)."""
    parts = pending.pop(name, None)
    if parts is None or parts.get(leaf) is None:
        key = f"{name}.weight"
        if key not in checkpoint:
            raise CheckpointError(f"{source} does not match the model: tensor {_to_file_key(key)} is missing")
        weight = checkpoint.get(key).float()
        if tuple(weight.shape) != (layer.n * layer.out_features, layer.in_features):
            raise CheckpointError(f"{source}: tensor {_to_file_key(key)} has shape {tuple(weight.shape)}, the "
                                  f"model expects {(layer.n * layer.out_features, layer.in_features)}")
        fresh = QuantizedLinear.from_weight(weight, layer.bits, n=layer.n, group_size=group_size,
                                            symmetric=layer.symmetric)
        state = fresh.state_dict()
        if parts is None:
            parts = {k: v.to(device) for k, v in state.items()}
        else:
            parts[leaf] = state[leaf].to(device)
    value = parts.pop(leaf)
    if leaf != "weight" and "weight" in parts:
        parts["weight"] = None  # quantized again when asked
    if parts:
        pending[name] = parts
    return value


def _check_quantized_dtypes(lm: LMModel, checkpoint: _LazyCheckpoint, source: Path, bits: int) -> None:
    expected = torch.int8 if bits == 8 else torch.uint8
    for name, module in lm.named_modules():
        if isinstance(module, QuantizedLinear):
            key = f"{name}.weight"
            stored = checkpoint.dtype(key) if key in checkpoint else None
            if stored is not None and stored != expected:
                raise CheckpointError(f"{source}: {_to_file_key(key)} is {stored}, not the {expected} of an "
                                      f"int{bits} checkpoint (config.json and the weights disagree)")


def save_quantized_lm(lm: LMModel, folder: str | Path, config: LMConfig | None = None) -> Path:
    """Write a quantized LM as config.json + model.q8.safetensors (or .q4.)."""
    bits = next((m.bits for m in lm.modules() if isinstance(m, QuantizedLinear)), None)
    if bits is None:
        raise ConfigError("the LM has no quantized layer: quantize it first (quantize_lm_)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = next(m for m in lm.modules() if isinstance(m, QuantizedLinear))
    fields = quantization_config(bits, first.group_size, first.symmetric)
    name = f"model.q{bits}.safetensors"
    cfg = (config or lm.cfg).replace(moshi_name=name, lora=False, lora_name=None, **fields)
    save_safetensors(quantized_state_dict(lm), folder / name,
                     metadata={"openmoshi_quantization": json.dumps(fields["quantization"] or {"bits": 8})})
    (folder / CONFIG_NAME).write_text(json.dumps(cfg.to_kyutai(), indent=2) + "\n")
    return folder


def write_quantized_lm(source: str | Path, folder: str | Path, bits: int, group_size: int = INT4_GROUP,
                       symmetric: bool = True) -> tuple[Path, int]:
    """Quantize the float LM of `source` straight into folder/model.q{bits}.safetensors + config.json, one
    tensor at a time: read, quantize, write, drop (the model is never held; peak ~ one float weight).

    The file equals what save_quantized_lm writes for load_quantized_lm(source, quantize=bits), but for
    embedding tables, which keep the checkpoint's float dtype (bf16 for Kyutai's files). Returns
    (folder, number of quantized layers).
    """
    check_bits(bits)
    cfg, _ = read_config(source)
    held = stored_bits(cfg)
    if held is not None:
        raise ConfigError(f"{source} already holds int{held} weights; quantize the float model instead")
    folder = Path(folder)
    name = f"model.q{bits}.safetensors"
    if cfg.lora:  # the adapters are fused into the float weights first: through the whole model
        lm = load_quantized_lm(source, quantize=bits, group_size=group_size, build_kernels=False,
                               symmetric=symmetric)
        save_quantized_lm(lm, folder, config=lm.cfg.replace(moshi_name=cfg.moshi_name))
        return folder, sum(isinstance(m, QuantizedLinear) for m in lm.modules())
    weights = _weights_path(source, cfg)
    checkpoint = _LazyCheckpoint(weights)
    try:
        lm, tensor, float_dtype = _plan(cfg, None, bits, checkpoint, weights, "cpu", torch.float32, group_size,
                                        symmetric)
        targets = {_to_file_key(k): (k, t) for k, t in lm.state_dict().items()}
        specs = {}
        for file_key, (key, target) in targets.items():
            stored = target.dtype
            if target.dtype.is_floating_point and target.dtype == torch.float32 and key in checkpoint:
                stored = float_dtype(key, checkpoint.dtype(key))
            specs[file_key] = (stored, tuple(target.shape))

        def value(file_key: str) -> torch.Tensor:
            key, target = targets[file_key]
            out = tensor(key, target)
            if tuple(out.shape) != tuple(target.shape):
                raise CheckpointError(f"{weights}: tensor {file_key} has shape {tuple(out.shape)}, the model "
                                      f"expects {tuple(target.shape)}")
            return out
        folder.mkdir(parents=True, exist_ok=True)
        fields = quantization_config(bits, group_size, symmetric)
        write_safetensors(folder / name, specs, value,
                          metadata={"openmoshi_quantization": json.dumps(fields["quantization"] or {"bits": 8})})
    finally:
        checkpoint.close()
    out_cfg = cfg.replace(moshi_name=name, lora=False, lora_name=None, **fields)
    (folder / CONFIG_NAME).write_text(json.dumps(out_cfg.to_kyutai(), indent=2) + "\n")
    return folder, sum(isinstance(m, QuantizedLinear) for m in lm.modules())


def copy_model_files(source: str | Path, folder: Path, cfg: LMConfig) -> None:
    """Copy the non-LM files of a model folder (Mimi, tokenizer, Mimi config) next to a quantized LM."""
    import shutil
    model = ModelSource.around(source)
    names = [(cfg.mimi_name, "Mimi weights"), (cfg.tokenizer_name, "text tokenizer")]
    if cfg.mimi_config_name:
        names.append((cfg.mimi_config_name, "Mimi config"))
    for name, what in names:
        if "/" in name or name.startswith("hf://"):
            continue  # a reference to another repo stays a reference
        shutil.copyfile(model.require(name, what), folder / name)
