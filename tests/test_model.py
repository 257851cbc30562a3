"""The Performer LM (slimtune/model.py): the full forward against the independent float64 model of
tests/reference.py for every feature map and both layer-norm placements; the full forward equals forward_chunk run
chunk by chunk with carried states, and `advance` gives the same states; the embedding against its formula at a
far position; zero states and FAVOR+ draws; and from_pretrained / save_pretrained round trips bit for bit (a new
model, a loaded one in each dtype, an hf folder, a dtype cast)."""

import json
import math

import pytest
import reference
import torch
from helpers import assert_close, projections, safetensors_layout, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimtune import lora
from slimtune.checkpoint import expected_shapes, load_checkpoint, save_checkpoint
from slimtune.memory import TensorBytes
from slimtune.pretrained import PerformerLM

FEATURES = ["sqr", "relu", "elu+1", "abs", "favor+", "favor+_2"]


def _ids(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _checkpoint(path, dtype=torch.float32, **kw):
    model = tiny_model(dtype=torch.float32, **kw)
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, model.config, extra_config={"seq_len": 64})
    return path


@pytest.mark.parametrize("post", [True, False], ids=["postLN", "preLN"])
@pytest.mark.parametrize("feature", FEATURES)
def test_forward_matches_the_float64_reference(feature, post):
    model = tiny_model(feature, post)
    ids = _ids(2, 40)
    with torch.no_grad():
        logits = model(ids)
    expected = reference.logits(model.state_dict(), model.config.to_dict(), ids, projections(model))
    assert logits.shape == (2, 40, 256)
    assert_close(logits, expected, 1e-12, f"{feature} post={post}")


@pytest.mark.parametrize("sizes", [[1] * 12, [7, 7, 7, 7, 7, 5], [33, 1, 6], [40]], ids=lambda s: f"{len(s)}chunks")
@pytest.mark.parametrize("feature, post", [("elu+1", True), ("favor+", False)])
def test_forward_equals_forward_chunk_chunk_by_chunk(feature, post, sizes):
    model = tiny_model(feature, post)
    T = sum(sizes)
    ids = _ids(3, T, seed=1)
    with torch.no_grad():
        whole = model(ids)
        states, parts, start = model.initial_states(3), [], 0
        for size in sizes:
            logits, states = model.forward_chunk(ids[:, start : start + size], start, states)
            parts.append(logits)
            start += size
    assert_close(torch.cat(parts, dim=1), whole, 1e-12, "chunked logits")
    assert len(states) == model.config.n_layers


def test_advance_gives_the_states_of_forward_chunk():
    model = tiny_model("favor+_2", True)
    ids = _ids(2, 30, seed=2)
    with torch.no_grad():
        _, mid = model.forward_chunk(ids[:, :13], 0, model.initial_states(2))
        _, full_states = model.forward_chunk(ids[:, 13:], 13, mid)
        advanced = model.advance(ids[:, 13:], 13, mid)
    assert len(advanced) == len(full_states) == 2
    for layer, (a, b) in enumerate(zip(advanced, full_states, strict=True)):
        assert a.shape == b.shape
        assert_close(a, b, 1e-13, f"state of layer {layer}")


def test_initial_states_are_zeros_of_the_state_shape():
    model = tiny_model("favor+_2", True, hidden_dim=24, n_heads=3, dtype=torch.float32)  # d_h = 8, M = 16
    states = model.initial_states(5)
    assert len(states) == 2
    for s in states:
        assert s.shape == (5, 3, 16, 9) and s.dtype == torch.float32 and not s.any()
    assert model.initial_states(1, dtype=torch.float64)[0].dtype == torch.float64


def test_the_embedding_is_the_token_and_its_sines_and_cosines():
    """x = [E[id], sin(p w_j), cos(p w_j)] with w_j = 10000^(-2j / (d/2)), here at positions 10^5 and on."""
    model = tiny_model(dtype=torch.float64)  # d = 16: 8 embedding columns, 4 sines, 4 cosines
    ids = _ids(1, 3, seed=3)
    start = 100_000
    with torch.no_grad():
        x = model.embed(ids, start)
    assert x.shape == (1, 3, 16)
    for t in range(3):
        p = start + t
        w = [10000.0 ** (-2 * j / 8) for j in range(4)]
        expected = model.input_map.weight[ids[0, t]].tolist() + [math.sin(p * wj) for wj in w]
        expected += [math.cos(p * wj) for wj in w]
        assert x[0, t].tolist() == pytest.approx(expected, abs=1e-9)


def test_feature_draws():
    elementwise = tiny_model("sqr")
    elementwise.redraw_features(torch.Generator().manual_seed(0))
    assert projections(elementwise) is None  # nothing to draw
    model = tiny_model("favor+_2", dtype=torch.float32)  # d_h 8: 16 features per head
    model.redraw_features(torch.Generator().manual_seed(4))
    first = [w.clone() for w in projections(model)]
    assert all(w.shape == (16, 8) and w.dtype == torch.float32 for w in first)
    assert not torch.equal(first[0], first[1])  # a draw of its own for each layer
    model.redraw_features(torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, projections(model), strict=True))
    model.redraw_features(torch.Generator().manual_seed(5))
    assert not torch.equal(first[0], projections(model)[0])
    assert "layers.0.attention.projection" not in model.state_dict()  # not saved: checkpoints keep the contract


def test_a_new_model_round_trips_bit_for_bit(tmp_path):
    model = tiny_model("relu", False, dtype=torch.float64, seed=6)
    out = model.save_pretrained(tmp_path / "new.safetensors", extra_config={"seq_len": 128})
    saved = load_checkpoint(out)
    assert saved.config == model.config and saved.extra_config == {"seq_len": 128}
    assert "slimtune_provenance" not in saved.metadata  # nothing to record for a model that was never loaded
    for name, t in model.state_dict().items():
        assert saved.tensors[name].dtype == torch.float64 and torch.equal(saved.tensors[name], t), name
    again = PerformerLM.from_pretrained(out, dtype=torch.float64)
    assert again.config == model.config and again.dtype == torch.float64
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    ids = _ids(2, 20, seed=7)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_save_pretrained_casts_to_the_dtype_asked_for(tmp_path):
    model = PerformerLM.from_pretrained(_checkpoint(tmp_path / "m.safetensors"))
    out = model.save_pretrained(tmp_path / "half.safetensors", dtype="fp16")
    saved = load_checkpoint(out)
    for name, t in model.state_dict().items():
        assert saved.tensors[name].dtype == torch.float16 and torch.equal(saved.tensors[name], t.half()), name


def test_a_loaded_model_holds_the_weights_once(tmp_path):
    model = PerformerLM.from_pretrained(_checkpoint(tmp_path / "m.safetensors", dtype=torch.bfloat16))
    assert model.dtype == torch.float32 and model.source is not None
    assert all(t.device.type == "meta" for t in model.source.tensors.values())  # released after loading
    assert {t.dtype for t in model.source.tensors.values()} == {torch.bfloat16}  # but its dtypes are known


# ---------------------------------------------------------------- moved from test_api.py


def test_save_then_load_round_trips_bit_for_bit_in_each_dtype(tmp_path):
    src = _checkpoint(tmp_path / "half.safetensors", dtype=torch.bfloat16)
    model = PerformerLM.from_pretrained(src)
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights in memory
    out = model.save_pretrained(tmp_path / "again.safetensors", metadata={"note": "round trip"})
    a, b = load_checkpoint(src), load_checkpoint(out)
    assert a.config == b.config and b.extra_config["seq_len"] == 64
    for name, t in a.tensors.items():
        assert b.tensors[name].dtype == torch.bfloat16 and torch.equal(b.tensors[name], t), name
    provenance = json.loads(b.metadata["slimtune_provenance"])
    assert provenance["note"] == "round trip" and len(provenance["base_sha256"]) == 64
    reloaded = PerformerLM.from_pretrained(out)
    for name, t in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t), name


def test_an_hf_folder_loads(tmp_path):
    model = PerformerLM.from_pretrained(_checkpoint(tmp_path / "m.safetensors"))
    folder = model.save_pretrained(tmp_path / "hf", format="hf")
    again = PerformerLM.from_pretrained(folder)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize(
    "stored, adapters, base_dtype, export",
    [
        (torch.float32, False, None, "auto"),  # nothing to copy
        (torch.float32, False, None, "bf16"),  # a cast of every tensor
        (torch.bfloat16, False, None, "auto"),  # held in fp32, written back in bf16
        (torch.float32, True, None, "auto"),  # the merged adapted weights
        (torch.float32, True, None, "bf16"),  # merged, then cast
        (torch.float32, True, torch.bfloat16, "auto"),  # a bf16 base of an fp32 input: read again, then merged
        (torch.bfloat16, True, None, "auto"),  # merged from bf16 through fp32
        (torch.float32, True, "nf4", "auto"),  # a quantized base: every layer map read again from the input
        (torch.bfloat16, True, "int8", "fp32"),  # read again in bf16, merged, cast
    ],
    ids=[
        "fp32",
        "fp32-cast",
        "bf16-input",
        "lora",
        "lora-cast",
        "lora-bf16-base",
        "lora-bf16-input",
        "lora-nf4-base",
        "lora-int8-base-bf16-input-cast",
    ],  # fmt: skip
)
def test_export_bytes_is_what_save_pretrained_allocates(tmp_path, stored, adapters, base_dtype, export):
    """The planner's export line: PerformerLM.export_bytes against the tensor bytes save_pretrained allocates at
    its peak (memory.TensorBytes; the base tensors read again from the input file are read into tensors it counts)."""
    model = _exported_model(tmp_path, stored, adapters, base_dtype)
    with TensorBytes() as allocated:
        model.save_pretrained(tmp_path / "out.safetensors", dtype=export)
    predicted = model.export_bytes(export)
    assert allocated.peak <= predicted <= allocated.peak * 1.05 + 4096, (predicted, allocated.peak)
    assert (predicted == 0) == (stored == torch.float32 and not adapters and export == "auto")


def _exported_model(tmp_path, stored, adapters, base_dtype, **sizes):
    model = PerformerLM.from_pretrained(_checkpoint(tmp_path / "in.safetensors", stored, **sizes))
    if adapters:
        lora.add(model, rank=2)
        with torch.no_grad():
            for m in lora.adapters(model).values():
                m.lora_B.weight.normal_()  # a non-zero delta
        if isinstance(base_dtype, str):
            lora.quantize_base(model, base_dtype)
        elif base_dtype is not None:
            lora.freeze_base_to(model, base_dtype)
    return model


@pytest.mark.parametrize(
    "adapters, base_dtype, export",
    [(False, None, "bf16"), (True, None, "auto"), (True, torch.bfloat16, "bf16"), (True, "nf4", "auto")],
    ids=["cast", "lora", "lora-bf16-base-cast", "lora-nf4-base"],
)
def test_the_export_holds_one_tensor_at_a_time_not_the_model(tmp_path, adapters, base_dtype, export):
    """Six layers of equal size: an export that made every tensor before writing (as it once did: a 46M-parameter
    model's LoRA export took 363 MB) allocates at least six layers' worth; tensor by tensor, less than two."""
    model = _exported_model(tmp_path, torch.float32, adapters, base_dtype, n_layers=6, hidden_dim=64, ffn_dim=64)
    written = torch.bfloat16 if export == "bf16" else torch.float32
    shapes = expected_shapes(model.config)  # a quantized base's state_dict holds no layer map weights
    layer = sum(math.prod(shape) for n, shape in shapes.items() if n.startswith("layers.0."))
    with TensorBytes() as allocated:
        model.save_pretrained(tmp_path / "out.safetensors", dtype=export)
    assert 0 < allocated.peak < 2 * layer * written.itemsize, (allocated.peak, layer)
    assert model.export_bytes(export) < 2 * layer * written.itemsize


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_the_streamed_export_is_what_safetensors_writes_for_the_merged_model(tmp_path, fmt):
    """The export against an independent whole-model one: each tensor computed here from the contract (the input's
    tensor, a target's W + (alpha / R) B @ A in fp32 cast to the input's dtype), all written by
    safetensors.torch.save_file with the same metadata. The files agree byte for byte but for the order of the
    metadata's keys (save_file takes it from a hash map), and load to identical tensors."""
    model = _exported_model(tmp_path, torch.bfloat16, True, torch.bfloat16)
    out = model.save_pretrained(tmp_path / "out", format=fmt, dtype="fp16")
    path = out / "model.safetensors" if fmt == "hf" else out
    source = load_checkpoint(tmp_path / "in.safetensors")
    expected = {}
    for name, tensor in source.tensors.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in model.state_dict():
            A, B = model.get_parameter(f"{prefix}.lora_A.weight"), model.get_parameter(f"{prefix}.lora_B.weight")
            tensor = (tensor.float() + 2.0 * (B @ A)).to(tensor.dtype)  # alpha 2R over R
        expected[name] = tensor.detach().half().contiguous()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(expected, str(tmp_path / "whole.safetensors"), metadata=metadata)
    ours, theirs = safetensors_layout(path), safetensors_layout(tmp_path / "whole.safetensors")
    assert ours == theirs
    assert {name for name, _ in ours[1]} == set(expected)  # every tensor, under the contract's names
    written = load_file(str(path))
    assert written.keys() == expected.keys() and all(torch.equal(written[n], t) for n, t in expected.items())


def test_loading_a_checkpoint_imports_no_sympy(tmp_path):
    """A checkpoint's model is made on the meta device without random init there: `normal_` on meta (or
    torch.device("meta") as a context) runs PyTorch's Python meta kernels, whose import of sympy and friends held
    75 MB resident in every process that loaded a checkpoint. A fresh process loads one and then looks."""
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model().state_dict(), tiny_model().config)
    script = (
        "import sys; from slimtune.pretrained import PerformerLM; "
        f"PerformerLM.from_pretrained({str(path)!r}); print('sympy' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "False", (run.stdout, run.stderr)
