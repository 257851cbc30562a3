"""The quantized formats of CONTRACT.md section 4 (slimtune/quant.py), against independent numpy computations:
int8 per-row absmax, nf4 blocks of 64 with QLoRA's levels (the nearest, found here from a full distance table), the
nibble order of the packing, odd sizes and zero blocks, and the bytes each format stores."""

import numpy as np
import pytest
import torch

from slimtune import quant
from slimtune.quant import NF4_LEVELS, dequantize, dequantize_nf4_torch, quantize

SHAPES = [(8, 64), (5, 37), (3, 200), (40, 24), (1, 1)]


@pytest.fixture(params=["whole", "row tiles"])
def tiles(request, monkeypatch):
    """Quantized a tile of rows at a time: the default tile (every shape here is one), or the smallest (a row, or
    nf4's rows to a block's edge: 8 rows of 24 values are 3 blocks)."""
    if request.param == "row tiles":
        monkeypatch.setattr(quant, "TILE_BYTES", 1)
    return request.param


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_is_per_row_absmax_over_127_rounded(shape, tiles):
    w = _weight(shape)
    q = quantize(w, "int8")
    ref = w.numpy().astype(np.float64)
    scale = np.abs(ref).max(axis=1) / 127
    expected = np.round(ref / scale[:, None])
    assert q.data.dtype == torch.int8 and np.array_equal(q.data.numpy(), expected.astype(np.int8))
    assert np.allclose(q.scales.numpy(), scale, rtol=1e-6)
    back = dequantize(q).numpy()
    assert np.all(np.abs(back - ref) <= scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_is_the_nearest_level_times_the_block_absmax(shape, tiles):
    w = _weight(shape, seed=1)
    q = quantize(w, "nf4")
    flat = w.numpy().astype(np.float64).reshape(-1)
    levels = np.array(NF4_LEVELS)
    expected_index, expected = [], []
    for start in range(0, flat.size, 64):
        block = flat[start : start + 64]
        absmax = np.abs(block).max()
        index = np.abs(block[:, None] / absmax - levels[None, :]).argmin(axis=1)  # a full distance table
        expected_index.extend(index)
        expected.extend(levels[index] * absmax)
    packed = q.data.numpy()
    unpacked = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[: flat.size]  # high nibble first
    assert np.array_equal(unpacked, expected_index)
    assert np.allclose(dequantize(q).numpy().reshape(-1), expected, rtol=1e-6, atol=0)
    assert q.scales.numel() == -(-flat.size // 64) and q.data.numel() == -(-flat.size // 2)


@pytest.mark.parametrize("shape", [(48, 64), (7, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_dequantizes_nf4_to_the_same_values_as_the_pytorch_lookup(shape, dtype):
    """Where bitsandbytes is installed, `dequantize` uses it: bit for bit the values of the PyTorch lookup, and both
    the levels times the block absmax computed here in numpy. Skipped without bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    if quant.library() != "bitsandbytes":
        pytest.skip(f"{quant.NO_LIBRARY} is set")
    q = quantize(_weight(shape, seed=3), "nf4")
    ours, library = dequantize_nf4_torch(q, dtype), dequantize(q, dtype)
    into_buffer = dequantize(q, dtype, scratch=True)  # on the CPU its kernel writes into our reused buffer
    assert library.dtype == into_buffer.dtype == dtype and torch.equal(library, ours) and torch.equal(into_buffer, ours)
    packed = q.data.numpy()
    index = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)
    levels = np.array(NF4_LEVELS, dtype=np.float32)[index]
    expected = (levels.reshape(-1, 64) * q.scales.numpy()[:, None]).reshape(shape)
    assert torch.equal(ours, torch.from_numpy(expected).to(dtype))


def test_zero_rows_and_blocks_dequantize_to_zero():
    w = torch.zeros(4, 64)
    w[1] = _weight((64,))
    for fmt in ("int8", "nf4"):
        back = dequantize(quantize(w, fmt))
        assert torch.equal(back[0], torch.zeros(64)) and torch.equal(back[2:], torch.zeros(2, 64))


def test_the_bytes_each_format_stores():
    w = _weight((256, 1024))
    assert quantize(w, "int8").nbytes == 256 * 1024 + 256 * 4  # one byte a weight, an fp32 scale a row
    assert quantize(w, "nf4").nbytes == 256 * 1024 // 2 + 256 * 1024 // 64 * 4  # 0.5625 bytes a weight


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="int8, nf4"):
        quantize(_weight((2, 2)), "fp8")


def _lora(out, inner, rank=3, dtype=torch.float64, seed=4):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, inner, generator=g, dtype=dtype) * 0.1).requires_grad_()
    b = (torch.randn(out, rank, generator=g, dtype=dtype) * 0.1).requires_grad_()
    return a, b


def _against_plain_autograd(q, bias, scaling: float, batch: tuple[int, int]) -> None:
    """quantized_lora_linear's output, dx, dA and dB against plain autograd through W = dequantize(q) in float64
    (exact: each value an 8-bit integer or a level times an fp32 scale)."""
    from slimtune.quant import quantized_lora_linear

    out, inner = q.shape
    a, b = _lora(out, inner)
    x = torch.randn(*batch, inner, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*batch, out, dtype=torch.float64)
    y = quantized_lora_linear(x, q, bias, a, b, scaling)
    y.backward(g)
    ours = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None
    plain = x @ dequantize(q, torch.float64).t() + (0 if bias is None else bias) + scaling * (x @ a.t()) @ b.t()
    plain.backward(g)
    for mine, theirs in zip(ours, (plain.detach(), x.grad, a.grad, b.grad), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_a_lora_map_on_a_quantized_base_has_the_gradients_of_its_dequantized_weight(fmt, with_bias):
    q = quantize(_weight((48, 40), seed=2), fmt)
    _against_plain_autograd(q, torch.randn(48, dtype=torch.float64) * 0.01 if with_bias else None, 1.5, (2, 7))


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("inner", [64, 40])
def test_products_over_tiles_of_rows_equal_the_whole_weights(fmt, inner, monkeypatch):
    """A map's product dequantizes its weight a few rows at a time (nf4's tiles on block edges: 8 rows of 40
    values make 5 blocks): the same as plain autograd through the whole dequantized weight."""
    monkeypatch.setattr(quant, "TILE_BYTES", 4 * inner * 5)  # 5 rows a tile (int8), 8 (nf4, 40 values a row)
    q = quantize(_weight((37, inner), seed=5), fmt)
    assert len(q.tiles()) >= 4
    assert fmt == "int8" or all(start * inner % 64 == 0 for start, _ in q.tiles())
    _against_plain_autograd(q, torch.randn(37, dtype=torch.float64) * 0.01, 0.5, (3, 5))


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_product_holds_one_tile_of_dequantized_weight_not_the_map(fmt):
    """Tensor bytes created while a 4096 x 1024 map (16 MB in fp32) computes forward and backward over 8 tokens:
    the tile (4 MB of fp32 weight, TILE_BYTES) and its index or integer copies, never the whole map's."""
    from slimtune.memory import TensorBytes
    from slimtune.quant import TILE_BYTES, quantized_lora_linear

    q = quantize(_weight((4096, 1024)), fmt)
    x = torch.randn(8, 1024, requires_grad=True)
    with TensorBytes() as counted:
        quantized_lora_linear(x, q, None).sum().backward()
    whole = 4096 * 1024 * 4
    assert counted.peak < 2 * TILE_BYTES <= whole / 2, counted.peak


def test_the_dequantized_weight_is_never_saved_for_backward():
    """What autograd keeps between forward and backward: x, the adapters and x A^T, never an [out, in] weight."""
    from slimtune.quant import quantized_lora_linear

    q = quantize(_weight((512, 256)), "nf4")
    a, b = _lora(512, 256, dtype=torch.float32)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        quantized_lora_linear(x, q, None, a, b, 2.0).sum().backward()
    assert saved and max(saved) < 512 * 256 // 4  # the largest saved: lora_B [512, 3] or x [4, 256]


def test_under_bf16_autocast_the_products_run_in_bf16():
    from slimtune.quant import quantized_lora_linear

    q = quantize(_weight((64, 64)), "int8")
    a, b = _lora(64, 64, dtype=torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized_lora_linear(x, q, None, a, b, 1.0)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    exact = x.detach() @ dequantize(q).t() + (x.detach() @ a.detach().t()) @ b.detach().t()
    assert torch.allclose(y.float(), exact, rtol=0.02, atol=0.02)


# ---------------------------------------------------------------- a quantized base in the model (lora.quantize_base)

L = 64


def _adapted(targets=None, seed=0):
    """A tiny float64 model with adapters whose lora_B is random (zeros would hide lora_A's gradient)."""
    from helpers import tiny_model

    from slimtune import lora

    model = tiny_model("sqr", True, dtype=torch.float64)
    lora.add(model, rank=3, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model.to(torch.float64)


def _reference(model, windows):
    """The float64 reference's loss and gradients for the model as quantized: its state with each quantized map's
    dequantized weight."""
    import reference
    from helpers import projections

    state = model.state_dict() | {
        f"{name}.weight": m.quantized.dequantize(torch.float64)
        for name, m in model.named_modules()
        if getattr(m, "quantized", None) is not None
    }
    cfg = model.config.to_dict() | {"lora_rank": 3, "lora_alpha": 6.0}
    return reference.loss_and_grads(state, cfg, windows, None, projections(model))


@pytest.mark.parametrize("targets", [None, "q_map,V_map"], ids=["every map", "two targets"])
@pytest.mark.parametrize("C", [1, 7, L])
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_slim_gradients_on_a_quantized_base_are_the_references_given_its_dequantized_weights(fmt, C, targets):
    from helpers import assert_close

    from slimtune import lora
    from slimtune.slim import slim_step

    model = _adapted(targets)
    saved = lora.quantize_base(model, fmt)
    maps = [m for m in model.modules() if getattr(m, "quantized", None) is not None]
    assert saved > 0 and len(maps) == 5 * model.config.n_layers  # every layer map, adapted or not
    assert not any(name.endswith(("q_map.weight", "U_map.weight")) for name, _ in model.named_parameters())
    windows = torch.randint(0, 256, (2, L + 1), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _reference(model, windows)
    loss = slim_step(model, windows, C)
    assert_close(loss, ref_loss, 1e-10, "loss")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        assert_close(p.grad, ref_grads[name], 1e-10, name)


def test_a_quantized_base_under_bf16_trains_close_to_fp32():
    from slimtune import lora
    from slimtune.slim import slim_step

    model = _adapted().to(torch.float32)
    lora.quantize_base(model, "nf4")
    windows = torch.randint(0, 256, (2, L + 1), generator=torch.Generator().manual_seed(1))
    exact = slim_step(model, windows, 16)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    mixed = slim_step(model, windows, 16, precision="bf16")
    assert abs(mixed - exact) <= 0.02 * exact
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (
                torch.isfinite(p.grad).all()
                and torch.nn.functional.cosine_similarity(p.grad.flatten(), grads[name].flatten(), dim=0) > 0.98
            ), name


def test_merging_a_quantized_base_is_refused():
    from slimtune import lora
    from slimtune.errors import ConfigError

    model = _adapted()
    lora.quantize_base(model, "int8")
    with pytest.raises(ConfigError, match="export it"):
        lora.merge(model)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_the_export_of_a_quantized_base_merges_into_the_input_s_own_weights(tmp_path, fmt):
    """CONTRACT section 4: the quantization changes what trains, never the exported base. Each target weight is the
    input's own plus (alpha / R) B A in fp32; every other tensor is the input's, bit for bit; and the counts of
    frozen parameters still include the quantized weights."""
    from helpers import save_model, tiny_model

    from slimtune import lora
    from slimtune.checkpoint import load_checkpoint
    from slimtune.pretrained import PerformerLM
    from slimtune.runplan import parameter_counts

    save_model(tmp_path / "base.safetensors", tiny_model(dtype=torch.float32, seed=3))
    model = PerformerLM.from_pretrained(tmp_path / "base.safetensors")
    total = sum(p.numel() for p in model.parameters())
    lora.add(model, rank=2, targets="q_map,U_map", seed=1)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    lora.quantize_base(model, fmt)
    trainable, frozen = parameter_counts(model)
    assert frozen == total and trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "tuned.safetensors")
    base, tuned = load_checkpoint(tmp_path / "base.safetensors"), load_checkpoint(tmp_path / "tuned.safetensors")
    adapters = {f"{name}.weight": m for name, m in lora.adapters(model).items()}
    for name, t in base.tensors.items():
        if name in adapters:
            m = adapters[name]
            expected = t.float() + 2.0 * (m.lora_B.weight.detach().float() @ m.lora_A.weight.detach().float())
            assert torch.equal(tuned.tensors[name], expected.to(t.dtype)), name
        else:
            assert torch.equal(tuned.tensors[name], t), name


LOAD = """
import sys, torch
from slimtune import lora
from slimtune.checkpoint import load_checkpoint
from slimtune.memory import peak_rss, process_rss, release_free_heap, reset_peak_rss
from slimtune.pretrained import PerformerLM
read = lora.read_dtypes(sys.argv[3])
PerformerLM.from_checkpoint(load_checkpoint(sys.argv[2], dtype=read))  # the code paths' pages, once
release_free_heap()
before = process_rss()
if not reset_peak_rss():
    print("no peak counter"); sys.exit(0)
model = PerformerLM.from_checkpoint(load_checkpoint(sys.argv[1], dtype=read))
release_free_heap()
print(peak_rss() - before, process_rss() - before)
"""


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_checkpoint_is_quantized_as_it_is_read_never_held_in_fp32(tmp_path, fmt):
    """Reading a 67 MB fp32 checkpoint (4 layers, 17 maps of 8.4 MB) as a quantized base, in a fresh process
    (VmHWM): the peak stays below what even a bf16 base holds (34 MB), because one fp32 tensor at a time is read and
    quantized; what stays is the quantized weights and the fp32 rest, counted here from the shapes."""
    import subprocess
    import sys

    from helpers import save_model, tiny_model

    model = tiny_model(dtype=torch.float32, hidden_dim=64, n_layers=4, ffn_dim=32768, n_heads=2)
    path = save_model(tmp_path / "m.safetensors", model)
    warm = save_model(tmp_path / "warm.safetensors", tiny_model(dtype=torch.float32, hidden_dim=64, ffn_dim=128))
    layer_maps = {n: p for n, p in model.state_dict().items() if n.startswith("layers.") and n.endswith("map.weight")}
    per_weight = 1 if fmt == "int8" else 0.5 + 4 / 64
    quantized = sum(p.numel() * per_weight + (p.shape[0] * 4 if fmt == "int8" else 0) for p in layer_maps.values())
    rest = sum(p.numel() * 4 for n, p in model.state_dict().items() if n not in layer_maps)
    bf16 = sum(p.numel() * 2 for p in layer_maps.values()) + rest
    run = subprocess.run([sys.executable, "-c", LOAD, str(path), str(warm), fmt], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    if run.stdout.startswith("no peak counter"):
        pytest.skip("the kernel's peak RSS counter cannot be reset here")
    peak, held = map(int, run.stdout.split())
    assert peak < bf16, (peak, bf16)
    assert 0.9 * (quantized + rest) < held < 1.1 * (quantized + rest) + (2 << 20), (held, quantized + rest)


def test_moving_a_model_moves_its_quantized_weights_and_keeps_their_format():
    """model.to(device) (here the meta device, where nothing is computed) moves each map's quantized data and scales
    with the parameters; model.to(dtype) leaves them in their format (int8 or uint8 data, fp32 scales)."""
    from helpers import tiny_model

    from slimtune import lora

    model = tiny_model(dtype=torch.float32, hidden_dim=32, ffn_dim=64)
    lora.add(model, rank=2)
    lora.quantize_base(model, "nf4")
    model.to(torch.bfloat16)
    q = model.layers[0].U_map.quantized
    assert q.data.dtype == torch.uint8 and q.scales.dtype == torch.float32
    model.to("meta")
    assert all(m.quantized.data.device.type == "meta" == m.quantized.scales.device.type
               for m in model.modules() if getattr(m, "quantized", None) is not None)  # fmt: skip
