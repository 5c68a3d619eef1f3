"""int8 / int4 weights: hand-computed round trips, kernels against dequantized matmuls, quantized models that
generate, quantized folders that load as saved, Kyutai's q8 layout, and clear errors for bad bits or files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lm_utils import frames, random_codes, run, sharp_model, small_config

from openmoshi.bundle import init_model, load_model
from openmoshi.checkpoint import save_safetensors
from openmoshi.cli.main import main
from openmoshi.errors import CheckpointError, ConfigError
from openmoshi.generation.generator import Generator
from openmoshi.lm.quantized import load_quantized_lm, quantize_lm_, save_quantized_lm
from openmoshi.nn import quant
from openmoshi.nn.quant import QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_int8_round_trip_matches_hand_computed_values():
    # row absmax 127/64 -> scale 1/64 exactly (a bfloat16 value); q = round(w * 64)
    w = torch.tensor([[127 / 64, -1.0, 0.5, 0.2, -0.3, 0.0, 1 / 64, -127 / 64]])
    q, scb = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scb.dtype == torch.float32
    assert q.tolist() == [[127, -64, 32, 13, -19, 0, 1, -127]]
    assert scb.tolist() == [127 / 64]  # Kyutai's layout: the row's absolute maximum
    expected = torch.tensor([[127, -64, 32, 13, -19, 0, 1, -127]]) / 64
    assert torch.equal(quant.dequantize_int8(q, scb), expected)


def test_int4_round_trip_matches_hand_computed_values():
    # one group of 32: min -1, max 0.875 -> scale 1.875 / 15 = 0.125, zero = -1 + 8 * 0.125 = 0
    values = torch.tensor([-1.0, 0.875, 0.0, 0.3] + [0.1] * 28)
    packed, scale, zero = quant.quantize_int4(values[None], group_size=32)
    assert scale.tolist() == [[0.125]] and zero.tolist() == [[0.0]]
    # q = round(w / 0.125 + 8): -1 -> 0, 0.875 -> 15, 0 -> 8, 0.3 -> 10, 0.1 -> 9; two per byte, first high
    assert packed.shape == (1, 16) and packed.dtype == torch.uint8
    assert packed[0, :3].tolist() == [0x0F, 0x8A, 0x99]
    deq = quant.dequantize_int4(packed, scale, zero)
    assert deq[0, :4].tolist() == [-1.0, 0.875, 0.0, 0.25] and torch.all(deq[0, 4:] == 0.125)


def test_symmetric_int4_round_trip_matches_hand_computed_values():
    # group 1: largest magnitude -1 -> scale -1 / -8 = 0.125; group 2: largest 1 -> scale -0.125 (signed);
    # group 3: -1 and 1 -> the first, scale 0.125, and 1 / 0.125 + 8 = 16 is clipped to 15; group 4: zeros
    values = torch.zeros(4, 32)
    values[0, :4] = torch.tensor([-1.0, 0.875, 0.0, 0.3])
    values[0, 4:] = 0.1
    values[1, :3] = torch.tensor([1.0, -0.5, 0.9])
    values[2, :2] = torch.tensor([-1.0, 1.0])
    packed, scale = quant.quantize_int4_symmetric(values.view(1, 128), group_size=32)
    assert scale.dtype == torch.bfloat16 and scale.tolist() == [[0.125, -0.125, 0.125, 1.0]]
    # q = round(w / scale + 8), two per byte, the even column in the high nibble
    q = quant.unpack_int4(packed).view(4, 32)
    assert q[0, :5].tolist() == [0, 15, 8, 10, 9] and q[1, :4].tolist() == [0, 12, 1, 8]
    assert q[2, :3].tolist() == [0, 15, 8] and torch.all(q[3] == 8)
    assert packed[0, :3].tolist() == [0x0F, 0x8A, 0x99]
    deq = quant.dequantize_int4(packed, scale, None).view(4, 32)  # (q - 8) * scale
    assert deq[0, :5].tolist() == [-1.0, 0.875, 0.0, 0.25, 0.125]
    assert deq[1, :4].tolist() == [1.0, -0.5, 0.875, 0.0]
    assert deq[2, :3].tolist() == [-1.0, 0.875, 0.0] and torch.all(deq[3] == 0)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False)])
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_quantized_matmul_equals_the_dequantized_weights_matmul(bits, symmetric, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    layer = QuantizedLinear.from_weight(weight, bits, bias, symmetric=symmetric)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        out = layer(x)
    deq = layer.dequantized()
    if rows <= quant.MAX_KERNEL_ROWS:  # the kernels take bfloat16 activations, accumulate in float32
        expected = x.bfloat16().float() @ deq.T + bias
        tol = 2 ** -8  # one bfloat16 rounding of the output
    else:  # long inputs: one float matmul on the dequantized weight
        expected = x @ deq.T + bias
        tol = 1e-6
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    assert ((out - expected).norm() / expected.norm()).item() < tol
    # and the quantization error itself is what int8 / int4 should give on Gaussian weights
    error = (deq - weight).norm() / weight.norm()
    assert error < (0.01 if bits == 8 else 0.12)


def test_symmetric_int4_layers_of_any_shape_share_the_zeros_buffer():
    # the kernels take [G, N, 2] scales and zeros; symmetric layers write their scales into one reused buffer
    torch.manual_seed(0)
    layers = [QuantizedLinear.from_weight(torch.randn(n, k), 4) for n, k in [(64, 256), (32, 64), (96, 128)]]
    for layer in [*layers, *layers[::-1]]:
        x = torch.randn(2, layer.in_features)
        with torch.no_grad():
            out = layer(x)
        expected = x.bfloat16().float() @ layer.dequantized().T
        assert ((out - expected).norm() / expected.norm()).item() < 2 ** -8
    scales = torch.randn(5, 7).bfloat16()  # the kernel's [G, N, 2] layout, zeros beside the scales
    assert torch.equal(quant._with_zeros(scales), torch.stack([scales, torch.zeros_like(scales)], -1))


def test_stacked_per_step_weights_use_their_own_block():
    torch.manual_seed(0)
    weight = torch.randn(3 * 32, 64)  # 3 steps of [32, 64]
    layer = QuantizedLinear.from_weight(weight, 8, n=3)
    x = torch.randn(2, 2, 64)
    with torch.no_grad():
        out = layer(x, [2, 0])
    for t, step in enumerate([2, 0]):
        ref = x[:, t].bfloat16().float() @ layer.dequantized(step).T
        assert ((out[:, t] - ref).norm() / ref.norm()) < 2 ** -8


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiny_model_generates_what_it_predicts(bits):
    cfg = small_config()
    lm = sharp_model(cfg)
    qlm = copy.deepcopy(lm)
    names = quantize_lm_(qlm, bits)
    assert "transformer.layers.0.self_attn.in_proj" in names and "depformer.layers.1.self_attn.out_proj" in names
    assert qlm.cfg.quantize == (bits == 8)
    steps, batch = 30, 2
    user = random_codes(cfg, batch, steps, seed=2)[:, 1 + cfg.dep_q:]
    out = frames(run(Generator(qlm, temp=0, temp_text=0), user, steps, batch))
    assert out.shape == (batch, 1 + cfg.dep_q, steps - cfg.max_delay) and out.min() >= 0
    # the generated tokens are the float model's greedy choices on the same context, nearly always
    codes = torch.cat([out, user[..., 1:out.shape[-1] + 1]], dim=1)
    with torch.no_grad():
        pred = lm(codes)
    audio = pred.audio_logits.argmax(-1)[pred.audio_mask] == out[:, 1:1 + cfg.dep_q][pred.audio_mask]
    assert audio.float().mean() > (0.9 if bits == 8 else 0.6), audio.float().mean()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("models") / "fp", seed=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_round_trip_gives_the_same_outputs_without_requantizing(tiny_folder, tmp_path, bits):
    from safetensors.torch import load_file
    assert main(["quantize", str(tiny_folder), str(tmp_path / "q"), "--bits", str(bits)]) == 0
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    assert raw.get("quantize", False) == (bits == 8) and raw.get("quantization", {}).get("bits", 8) == bits
    stored = load_file(str(tmp_path / "q" / raw["moshi_name"]))
    assert stored["transformer.layers.0.self_attn.in_proj_weight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    # mark one stored weight: a loader that quantized again would not see the mark
    key = "transformer.layers.0.gating.linear_in.weight"
    stored[key][0, 0] = stored[key][0, 0] ^ 1
    save_safetensors(stored, tmp_path / "q" / raw["moshi_name"])

    loaded = load_model(tmp_path / "q")
    again = load_model(tmp_path / "q")
    layer = loaded.lm.transformer.layers[0].gating.linear_in
    assert isinstance(layer, QuantizedLinear) and torch.equal(layer.weight, stored[key])
    codes = random_codes(loaded.config, 1, 6)
    with torch.no_grad():
        a, b = loaded.lm(codes), again.lm(codes)
    assert torch.equal(a.audio_logits.nan_to_num(), b.audio_logits.nan_to_num())
    # quantizing while loading the float folder gives the same tensors as the saved folder (but the mark)
    fresh = load_model(tiny_folder, quantize=bits)
    for (name, x), (_, y) in zip(sorted(fresh.lm.state_dict().items()), sorted(loaded.lm.state_dict().items())):
        if not name.endswith(key.split("transformer.layers.0.")[1]) or "layers.0." not in name:
            assert torch.equal(x, y), name
    assert any(isinstance(m, QuantizedLinear) for m in loaded.mimi.modules())  # Mimi's transformers: int8


def test_kyutai_q8_layout_loads(tiny_folder, tmp_path):
    """A file in kyutai/moshiko-pytorch-q8's layout (bitsandbytes int8: CB and SCB = row absmax, every linear
    of the LM, attention weights of the depth transformer one per step) loads and computes CB * SCB / 127."""
    fp = load_quantized_lm(tiny_folder)
    cfg = fp.cfg
    state, reference = {}, copy.deepcopy(fp)
    ref_params = dict(reference.named_parameters())
    for name, tensor in fp.state_dict().items():
        is_linear = (name.endswith(("in_proj_weight", "out_proj.weight", "linear_in.weight", "linear_out.weight"))
                     or name.startswith(("text_linear.", "linears.", "depformer_in.")))
        if not is_linear or not name.endswith("weight"):
            state[name] = tensor
            continue
        scb = tensor.abs().amax(dim=1)
        cb = torch.round(tensor * 127 / scb[:, None]).to(torch.int8)
        with torch.no_grad():
            ref_params[name].copy_(cb.float() * scb[:, None] / 127)
        if name.startswith("depformer.") and "self_attn" in name:  # Kyutai's per-step spelling
            kind = "in_projs" if "in_proj" in name else "out_projs"
            prefix = name.split("self_attn.")[0] + "self_attn."
            for i, (c, s) in enumerate(zip(cb.chunk(cfg.dep_q), scb.chunk(cfg.dep_q))):
                state[f"{prefix}{kind}.{i}.weight"], state[f"{prefix}{kind}.{i}.weight_scb"] = c, s
        else:
            state[name], state[name + "_scb"] = cb, scb
    folder = tmp_path / "q8"
    folder.mkdir()
    save_safetensors(state, folder / "model.q8.safetensors")
    raw = dict(cfg.to_kyutai(), quantize=True, moshi_name="model.q8.safetensors")
    (folder / "config.json").write_text(json.dumps(raw))
    lm = load_quantized_lm(folder)
    assert isinstance(lm.depformer.layers[0].self_attn.in_proj, QuantizedLinear)
    codes = random_codes(cfg, 1, 6)
    with torch.no_grad():
        got, want = lm(codes), reference(codes)
    mask = want.audio_mask[..., None].expand_as(want.audio_logits)
    err = (got.audio_logits[mask] - want.audio_logits[mask]).norm() / want.audio_logits[mask].norm()
    assert err < 0.02  # bfloat16 activations and scales


def test_wrong_bit_width_and_corrupt_files_are_clear_errors(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="8 .*or 4"):
        quant.check_bits(3)
    assert main(["quantize", str(tiny_folder), str(tmp_path / "q3"), "--bits", "3"]) == 1
    assert main(["quantize", str(tiny_folder), str(tmp_path / "q8"), "--bits", "8"]) == 0
    with pytest.raises(ConfigError, match="holds int8 weights.*--bits 4"):
        load_model(tmp_path / "q8", quantize=4)
    # config.json says int4 but the tensors are int8
    raw = json.loads((tmp_path / "q8" / "config.json").read_text())
    (tmp_path / "q8" / "config.json").write_text(json.dumps(dict(raw, quantize=False,
                                                                 quantization={"bits": 4, "group_size": 32})))
    with pytest.raises(CheckpointError, match="int4"):
        load_quantized_lm(tmp_path / "q8")
    (tmp_path / "q8" / "config.json").write_text(json.dumps(raw))
    # a truncated weights file
    path = tmp_path / "q8" / raw["moshi_name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="q8.safetensors"):
        load_quantized_lm(tmp_path / "q8")
    (tmp_path / "q8" / "config.json").write_text(json.dumps(dict(raw, quantization={"bits": 5})))
    with pytest.raises(ConfigError, match="bits 5"):
        load_quantized_lm(tmp_path / "q8")


def test_asymmetric_int4_folders_still_load_and_a_wrong_scheme_is_a_clear_error(tiny_folder, tmp_path):
    from safetensors.torch import load_file
    assert main(["quantize", str(tiny_folder), str(tmp_path / "a"), "--bits", "4", "--int4-scheme",
                 "asymmetric"]) == 0
    assert main(["quantize", str(tiny_folder), str(tmp_path / "s"), "--bits", "4"]) == 0
    raw = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in "as"}
    assert raw["a"]["quantization"]["scheme"] == "asymmetric" and raw["s"]["quantization"]["scheme"] == "symmetric"
    keys = {n: set(load_file(str(tmp_path / n / raw[n]["moshi_name"]))) for n in "as"}
    zeros = {k for k in keys["a"] if k.endswith("_zero")}
    assert zeros and keys["a"] - zeros == keys["s"]  # the symmetric file: the same tensors but the zeros
    # a folder written before the symmetric format (no "scheme") is asymmetric, and loads as stored
    old = dict(raw["a"], quantization={"bits": 4, "group_size": 32})
    (tmp_path / "a" / "config.json").write_text(json.dumps(old))
    lm = load_quantized_lm(tmp_path / "a")
    layer = lm.transformer.layers[0].gating.linear_in
    assert not layer.symmetric and lm.cfg.quantization["scheme"] == "asymmetric"
    reference = copy.deepcopy(load_model(tiny_folder).lm)
    quantize_lm_(reference, 4, symmetric=False)
    codes = random_codes(lm.cfg, 1, 6)
    with torch.no_grad():
        assert torch.equal(lm(codes).audio_logits.nan_to_num(), reference(codes).audio_logits.nan_to_num())
    # config.json and the file disagree on the scheme, either way; an unknown scheme
    for folder, scheme in (("a", "symmetric"), ("s", "asymmetric")):
        (tmp_path / folder / "config.json").write_text(json.dumps(
            dict(raw[folder], quantization={"bits": 4, "group_size": 32, "scheme": scheme})))
        with pytest.raises(CheckpointError, match=f"says {scheme} int4 weights but the file holds"):
            load_quantized_lm(tmp_path / folder)
    (tmp_path / "s" / "config.json").write_text(json.dumps(
        dict(raw["s"], quantization={"bits": 4, "group_size": 32, "scheme": "nf4"})))
    with pytest.raises(ConfigError, match="scheme 'nf4'"):
        load_model(tmp_path / "s")
    with pytest.raises(SystemExit):  # argparse: "invalid choice"
        main(["quantize", str(tiny_folder), str(tmp_path / "x"), "--bits", "4", "--int4-scheme", "nf4"])


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(ConfigError, match="quantize it first"):
        save_quantized_lm(sharp_model(small_config()), tmp_path)


def test_float_loaders_and_savers_follow_the_quantized_format(tmp_path):
    import openmoshi
    lm = sharp_model(small_config())
    quantize_lm_(lm, 8)
    openmoshi.save_lm(lm, tmp_path)  # the plain saver writes the quantized layout
    assert (tmp_path / "model.q8.safetensors").is_file()
    loaded = openmoshi.load_lm(tmp_path)  # and the plain loader reads it
    assert isinstance(loaded.transformer.layers[0].self_attn.in_proj, QuantizedLinear)
    assert torch.equal(loaded.transformer.layers[0].self_attn.in_proj.weight,
                       lm.transformer.layers[0].self_attn.in_proj.weight)
