"""Memory of quantized models: int4 layers keep one copy of their weights on CPU, a bf16 checkpoint quantized
while it streams equals the quantized in-memory model, a quantized folder loads without float weights, bf16
embedding tables give the rows of the widened table, and safetensors files are written one tensor at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_utils import random_codes
from safetensors.torch import load_file, save_file

from openmoshi.bundle import init_model, package_model
from openmoshi.checkpoint import save_safetensors
from openmoshi.cli.main import main
from openmoshi.lm.loading import load_lm
from openmoshi.lm.model import TokenEmbedding
from openmoshi.lm.quantized import load_quantized_lm, quantize_lm_
from openmoshi.nn import quant
from openmoshi.nn.quant import QuantizedLinear


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A tiny model folder whose LM is stored in bfloat16 (as Kyutai ships its LMs)."""
    root = tmp_path_factory.mktemp("models")
    return package_model(init_model("tiny", root / "fp", seed=0), root / "bf16")


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_layer_on_cpu_keeps_only_the_kernel_copy(symmetric):
    if quant.cpu_int4_block() is None:
        pytest.skip("this torch's CPU int4 layout is not the one nn/quant.py inverts")
    torch.manual_seed(0)
    weight, bias = torch.randn(3 * 64, 96), torch.randn(64)
    layer = QuantizedLinear.from_weight(weight, 4, bias, n=3, symmetric=symmetric)
    assert set(layer.state_dict()) == {"bias", *quant.int4_stored(symmetric)}
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    nbytes = layer.memory_bytes()
    x = torch.randn(1, 2, 96)
    with torch.no_grad():
        out = layer(x, [2, 0])
    assert "weight" not in layer._buffers and layer.memory_bytes() == nbytes  # one copy, another layout
    # torch's own conversion of the whole stored weight gives the same products
    for t, i in enumerate([2, 0]):
        rows = slice(64 * i, 64 * (i + 1))
        packed = torch._convert_weight_to_int4pack_for_cpu(
            quant.unpack_int4(stored["weight"][rows]).to(torch.int32), 1)
        scale = stored["weight_scale"][rows]
        zero = torch.zeros_like(scale) if symmetric else stored["weight_zero"][rows]
        scales = torch.stack([scale, zero], -1).transpose(0, 1)
        ref = torch._weight_int4pack_mm_for_cpu(x[:, t].bfloat16(), packed, 32, scales.contiguous()).float()
        assert torch.equal(out[:, t], ref + bias)
    # the stored tensors come back exactly: state dict, attribute, dequantized weights
    again = layer.state_dict()
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)
    assert torch.equal(layer.weight, stored["weight"])
    zero = None if symmetric else stored["weight_zero"][64:128]
    assert torch.equal(layer.dequantized(1), quant.dequantize_int4(
        stored["weight"][64:128], stored["weight_scale"][64:128], zero))
    # .to() puts them back as buffers; the next kernel call drops them again
    layer.to(torch.float32)
    assert torch.equal(layer._buffers["weight"], stored["weight"])
    with torch.no_grad():
        assert torch.equal(layer(x, [2, 0]), out)
    assert "weight" not in layer._buffers


@pytest.mark.parametrize("bits", [8, 4])
def test_streamed_quantization_equals_quantizing_the_loaded_model(bf16_folder, bits):
    streamed = load_quantized_lm(bf16_folder, quantize=bits)
    in_memory = load_lm(bf16_folder)  # the whole fp32 model, then quantized in place
    quantize_lm_(in_memory, bits)
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].to(b[key].dtype), b[key]), key
    tables = [m for m in streamed.modules() if isinstance(m, TokenEmbedding)]
    assert tables and all(m.weight.dtype == torch.bfloat16 and m.row_dtype == torch.float32 for m in tables)
    assert streamed.dtype == torch.float32
    codes = random_codes(streamed.cfg, 2, 8)
    with torch.no_grad():
        x, y = streamed(codes), in_memory(codes)
    assert torch.equal(x.text_logits.nan_to_num(), y.text_logits.nan_to_num())
    assert torch.equal(x.audio_logits.nan_to_num(), y.audio_logits.nan_to_num())


def test_quantized_folder_loads_without_float_weights(bf16_folder, tmp_path):
    assert main(["quantize", str(bf16_folder), str(tmp_path / "q4"), "--bits", "4"]) == 0
    stored = load_file(str(tmp_path / "q4" / "model.q4.safetensors"))
    assert stored["text_emb.weight"].dtype == torch.bfloat16  # tables kept as the checkpoint had them
    lm = load_quantized_lm(tmp_path / "q4")
    for name, tensor in [*lm.named_parameters(), *lm.named_buffers()]:
        if tensor.dtype.is_floating_point and tensor.dim() == 2 and not name.endswith(("_scale", "_zero")):
            module = lm.get_submodule(name.rpartition(".")[0])
            table = isinstance(module, TokenEmbedding) and tensor.dtype == torch.bfloat16
            assert table or not quant.quantizable(tuple(tensor.shape), 4), name  # only shapes int4 cannot take
    layers = [m for m in lm.modules() if isinstance(m, QuantizedLinear)]
    held = sum(m.memory_bytes() for m in layers)
    assert held == sum(stored[k].nbytes for k in stored if k.endswith(("_weight", ".weight", "_scale", "_zero"))
                       and stored[k].dtype != torch.float32 and "emb" not in k)
    reference = load_quantized_lm(bf16_folder, quantize=4)
    codes = random_codes(lm.cfg, 1, 6)
    with torch.no_grad():
        assert torch.equal(lm(codes).audio_logits.nan_to_num(), reference(codes).audio_logits.nan_to_num())
    assert sum(m.memory_bytes() for m in layers) == held  # the kernels replaced the stored copies


def test_narrow_embedding_table_gives_the_widened_rows():
    torch.manual_seed(0)
    wide = TokenEmbedding(50, 16)
    with torch.no_grad():
        wide.weight.copy_(wide.weight.bfloat16().float())  # values a bf16 checkpoint holds
    narrow = TokenEmbedding(50, 16).to(torch.bfloat16)
    narrow.load_state_dict({"weight": wide.weight.bfloat16()})
    narrow.row_dtype = torch.float32
    tokens = torch.tensor([[3, -1, 49, 0]])
    out = narrow(tokens)
    assert out.dtype == torch.float32 and torch.equal(out, wide(tokens))
    narrow.to("cpu")  # a move keeps the narrow table
    assert narrow.row_dtype == torch.float32 and narrow.weight.dtype == torch.bfloat16
    narrow.to(torch.bfloat16)  # a bf16 model: rows as stored
    assert narrow.row_dtype is None and narrow(tokens).dtype == torch.bfloat16
    narrow.row_dtype = torch.float32
    narrow.float()  # widened table: plain lookups
    assert narrow.row_dtype is None and torch.equal(narrow(tokens), wide(tokens))


def test_safetensors_written_one_tensor_at_a_time_read_back(tmp_path):
    state = {"a": torch.randn(3, 5), "b": torch.randn(4).bfloat16(), "c": torch.tensor(7),
             "d": torch.zeros(0, 2), "e": torch.arange(6, dtype=torch.uint8), "f": torch.tensor([True, False])}
    path = tmp_path / "x.safetensors"
    save_safetensors(state, path, metadata={"k": "v"})
    back = load_file(str(path))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    save_file(state, str(tmp_path / "y.safetensors"), metadata={"k": "v"})  # the same bytes as the package's
    assert (tmp_path / "y.safetensors").read_bytes() == path.read_bytes()
    (tmp_path / "y.safetensors").unlink()
    back["a"][0, 0] = 42.0  # tensors mapped from the file being replaced are written out intact
    save_safetensors(back, path)
    assert load_file(str(path))["a"][0, 0] == 42.0
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_lazy_kv_cache_is_zero_and_takes_ram_only_where_written():
    from openmoshi.nn.transformer import lazy_zeros

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    before = rss_kb()
    cache = lazy_zeros((1, 8, 4096, 64), torch.device("cpu"), torch.float32)  # 8 MiB
    assert cache.shape == (1, 8, 4096, 64) and cache.dtype == torch.float32
    assert rss_kb() - before < 2048  # nothing written yet
    cache[:, :, :16] = 1.0
    assert rss_kb() - before < 4096
    rest = cache[:, :, 16:]  # reductions only: reading the unwritten part adds no RAM
    assert cache.sum().item() == 8 * 16 * 64 and rest.amax().item() == 0 and rest.amin().item() == 0
    assert rss_kb() - before < 4096
    small = lazy_zeros((4, 4), torch.device("cpu"), torch.bfloat16)
    assert small.dtype == torch.bfloat16 and not small.any()


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


def test_embedding_tables_mapped_from_the_file_take_no_ram(tmp_path):
    from openmoshi.lm.quantized import _LazyCheckpoint
    table = torch.randn(4096, 1024).bfloat16()  # 8 MiB
    save_safetensors({"before": torch.ones(3), "table": table}, tmp_path / "t.safetensors")
    checkpoint = _LazyCheckpoint(tmp_path / "t.safetensors")
    mapped = checkpoint.mapped("table")
    checkpoint.close()
    assert mapped is not None and mapped.dtype == torch.bfloat16 and torch.equal(mapped, table)
    emb = TokenEmbedding(4096, 1024).to(torch.bfloat16)
    emb.weight = torch.nn.Parameter(mapped, requires_grad=False)
    emb.mapped, emb.row_dtype = mapped.data_ptr(), torch.float32
    tokens = torch.arange(4096).view(8, 512)
    with torch.no_grad():
        rows = emb(tokens)  # every row read, then the table's pages dropped from this process
        assert rows.dtype == torch.float32 and torch.equal(rows, table.float()[tokens])
        before = _rss_file_kb()  # (after the first call: the library code it ran is mapped from files too)
        emb(tokens)
    assert _rss_file_kb() - before < 1024
    emb.mapped = None  # an ordinary table: its pages stay
    with torch.no_grad():
        emb(tokens)
    assert _rss_file_kb() - before > 6 * 1024


def test_quantized_folder_maps_its_bf16_tables(bf16_folder, tmp_path):
    assert main(["quantize", str(bf16_folder), str(tmp_path / "q4"), "--bits", "4"]) == 0
    lm = load_quantized_lm(tmp_path / "q4")
    tables = [m for m in lm.modules() if isinstance(m, TokenEmbedding)]
    assert tables and all(m.mapped == m.weight.data_ptr() for m in tables)
    held = copy.deepcopy(lm)  # the same tables in ordinary memory
    assert not any(m.mapped == m.weight.data_ptr() for m in held.modules() if isinstance(m, TokenEmbedding))
    codes = random_codes(lm.cfg, 1, 6)
    with torch.no_grad():
        assert torch.equal(lm(codes).audio_logits.nan_to_num(), held(codes).audio_logits.nan_to_num())
    assert not any(m.mapped for m in load_quantized_lm(tmp_path / "q4", build_kernels=False).modules()
                   if isinstance(m, TokenEmbedding))  # a model to write out reads its tables


def test_weights_read_unmapped_leave_no_file_pages(tmp_path):
    from openmoshi.checkpoint import read_safetensors
    state = {"a": torch.randn(2048, 1024), "b": torch.arange(5)}  # 8 MiB
    save_safetensors(state, tmp_path / "w.safetensors")
    read_safetensors(tmp_path / "w.safetensors", mapped=False)["a"].sum()  # (library code mapped once)
    before = _rss_file_kb()
    own = read_safetensors(tmp_path / "w.safetensors", mapped=False)  # Mimi of a quantized bundle
    assert own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in state)
    assert _rss_file_kb() - before < 1024
    mapped = read_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(mapped["a"], state["a"]) and _rss_file_kb() - before > 6 * 1024
