"""LoRA adapters (slimtune/lora.py, CONTRACT.md section 4): SLiM's adapter gradients against the float64 reference
extended with adapters and against full backprop; the untrained adapter changes nothing; merge and the merged
export; PEFT's adapter format; a frozen bf16 base."""

import copy
import json
import math

import pytest
import reference
import torch
from helpers import assert_close, projections, rel_err, tiny_model
from safetensors.torch import load_file

from slimtune import lora
from slimtune.errors import CheckpointError, ConfigError
from slimtune.slim import slim_step

L = 100
FEATURES = ["sqr", "relu", "elu+1", "abs", "favor+"]
_cache = {}


def adapted(feature="sqr", post=True, dtype=torch.float64, rank=3, alpha=None, targets=None, seed=0):
    """A tiny model with adapters whose lora_B is random (the untrained zeros would hide lora_A's gradient)."""
    model = tiny_model(feature, post, dtype=dtype)
    lora.add(model, rank=rank, alpha=alpha, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model.to(dtype)


def windows(B=2, seed=0):
    return torch.randint(0, 256, (B, L + 1), generator=torch.Generator().manual_seed(seed))


def reference_grads(model, w):
    cfg = model.config.to_dict() | {"lora_rank": 3, "lora_alpha": 6.0}
    return reference.loss_and_grads(model.state_dict(), cfg, w, None, projections(model))


def expected(feature, post, targets):
    key = (feature, post, targets)
    if key not in _cache:
        _cache[key] = reference_grads(adapted(feature, post, targets=targets), windows())
    return _cache[key]


@pytest.mark.parametrize("batched", [False, True], ids=["plain", "batched"])
@pytest.mark.parametrize("C", [1, 7, 64, L], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("post", [True, False], ids=["postLN", "preLN"])
@pytest.mark.parametrize("feature", FEATURES)
def test_adapter_gradients_are_the_float64_references(feature, post, C, batched):
    ref_loss, ref_grads = expected(feature, post, None)
    model = adapted(feature, post)
    recovery = "store" if feature == "relu" else "subtract64"  # as in test_slim: relu's near-zero normalisers
    loss = slim_step(model, windows(), C, recovery=recovery, batch_weight_grads=batched)
    assert_close(loss, ref_loss, 1e-10, "loss")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in name for name in trained)
    assert len(trained) == 2 * 5 * model.config.n_layers  # q, k, v, U, V of every layer: A and B
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref_grads[name], 1e-10, name)
        else:
            assert p.grad is None, f"the frozen {name} got a gradient"


def test_the_output_map_can_be_a_target_too():
    ref_loss, ref_grads = expected("sqr", True, "q_map,output_logit_map")
    model = adapted(targets="q_map,output_logit_map")
    slim_step(model, windows(), 7)
    trained = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trained == sorted(
        f"{m}.{part}.weight"
        for m in ["output_logit_map"] + [f"layers.{i}.attention.q_map" for i in range(2)]
        for part in ("lora_A", "lora_B")
    )
    for name in trained:
        assert_close(model.get_parameter(name).grad, ref_grads[name], 1e-10, name)


@pytest.mark.parametrize("batched", [False, True], ids=["plain", "batched"])
def test_an_adapted_map_whose_base_trains_too_gets_the_reference_gradients(batched):
    """A frozen base runs each adapted map as one autograd node (lora._FrozenBaseLora); a base weight that trains
    takes autograd's own path. Both, in one model, give the reference's gradients."""
    ref_loss, ref_grads = expected("sqr", True, None)
    model = adapted()
    trains_too = ["layers.1.U_map.weight", "layers.1.U_map.bias", "layers.0.attention.k_map.weight"]
    for name in trains_too:
        model.get_parameter(name).requires_grad_(True)
    slim_step(model, windows(), 7, batch_weight_grads=batched)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref_grads[name], 1e-10, name)
    assert all(model.get_parameter(name).grad is not None for name in trains_too)


@pytest.mark.parametrize("C", [1, 16, L])
def test_fp32_slim_matches_full_backprop_of_the_same_lora_model(C):
    model = adapted(dtype=torch.float32)
    slim_step(model, windows(), L)
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    slim_step(model, windows(), C)
    for name, g in full.items():
        assert_close(model.get_parameter(name).grad, g, 1e-5, name)


def test_an_untrained_adapter_changes_nothing_and_its_lora_B_learns_at_once():
    """lora_B starts at zeros: the logits are the base's. Its gradient is not zero after one step (recomputation
    with frozen inputs can silently give an all-zero adapter), lora_A's is (it only matters through lora_B)."""
    base = tiny_model("sqr", True, dtype=torch.float64)
    model = tiny_model("sqr", True, dtype=torch.float64)
    lora.add(model, rank=4)
    ids = windows()[:, :-1]
    assert torch.equal(model(ids), base(ids))
    _, ref_grads = reference.loss_and_grads(
        model.state_dict(), model.config.to_dict() | {"lora_rank": 4, "lora_alpha": 8.0}, windows()
    )
    slim_step(model, windows(), 7)
    for name, m in lora.adapters(model).items():
        assert m.lora_B.weight.grad.abs().max() > 0, f"{name}: lora_B got an all-zero gradient"
        assert_close(m.lora_B.weight.grad, ref_grads[f"{name}.lora_B.weight"], 1e-10, name)
        assert m.lora_A.weight.grad.abs().max() == 0


def test_lora_A_starts_like_a_linear_weight_from_the_seed():
    """Kaiming-uniform with a = sqrt(5): uniform on +-1/sqrt(in) (torch.nn.Linear's rule); the seed decides."""
    one, same, other = (lora.add(tiny_model(dtype=torch.float32), rank=4, seed=s) for s in (3, 3, 4))
    for name, m in lora.adapters(one).items():
        bound = 1 / math.sqrt(m.in_features)
        w = m.lora_A.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound and w.std() > 0.4 * bound
        assert torch.equal(w, lora.adapters(same)[name].lora_A.weight)
        assert not torch.equal(w, lora.adapters(other)[name].lora_A.weight)
        assert torch.count_nonzero(m.lora_B.weight) == 0 and m.lora_A.weight.dtype == torch.float32


def test_merge_gives_the_adapted_models_logits_and_the_base_names():
    model = adapted(alpha=5.0)
    ids = windows()[:, :-1]
    before = model(ids)
    names = set(tiny_model().state_dict())
    lora.merge(model)
    assert set(model.state_dict()) == names
    assert_close(model(ids), before, 1e-12, "merged logits")


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_a_merged_export_weight_is_the_sum_in_fp32_cast_to_the_inputs_dtype(stored):
    model = adapted(dtype=torch.float32, targets="k_map,V_map")
    maps = lora.adapters(model)
    for name, m in maps.items():
        weight = tiny_model().get_parameter(f"{name}.weight").to(stored)  # the input checkpoint's tensor
        merged = lora.merged_weight(m, weight)
        A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
        assert merged.dtype == stored and merged.shape == weight.shape
        assert torch.equal(merged, (weight.float() + 2.0 * (B @ A)).to(stored)), name  # alpha 2R over R, in fp32
        want = weight.double() + 2.0 * B.double() @ A.double()
        assert torch.allclose(merged.double(), want, rtol=0, atol=2e-2 if stored != torch.float32 else 1e-6)
        assert not torch.equal(merged, weight)


def test_the_adapter_is_written_in_peft_format_and_reads_back(tmp_path):
    model = adapted(dtype=torch.float32, rank=2, alpha=3.0, targets="q_map,U_map")
    folder = lora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 3.0
    assert config["target_modules"] == ["q_map", "U_map"]
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors["base_model.model.layers.0.attention.q_map.lora_A.weight"]
    b = tensors["base_model.model.layers.1.U_map.lora_B.weight"]
    assert list(a.shape) == [2, 16] and list(b.shape) == [32, 2] and len(tensors) == 8
    again = lora.load_adapter(tiny_model(dtype=torch.float32), folder)
    ids = windows()[:, :-1]
    assert torch.equal(again(ids), model(ids))
    assert not any(p.requires_grad for p in again.parameters())
    with pytest.raises(CheckpointError, match="does not match the model"):
        lora.load_adapter(tiny_model(dtype=torch.float32, n_layers=3), folder)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rank=0), "`lora_rank` must be an integer >= 1"),
        (dict(rank=2, alpha=-1), "`lora_alpha` must be a positive number"),
        (dict(rank=2, targets="q_map,o_proj"), "unknown o_proj"),
        (dict(rank=2, targets=","), r"\(empty\)"),
    ],
)
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        lora.add(tiny_model(), **kw)


def test_a_frozen_bf16_base_trains_its_fp32_adapters_as_bf16_full_backprop_does():
    """The layers' frozen maps in bf16 (2 bytes a value), adapters fp32. Against the same weights in float64, SLiM
    under bf16 autocast at C = 16 is as close as a bf16 full-backprop step (C = L) is."""
    model = adapted(dtype=torch.float32)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saved = lora.freeze_base_to(model, torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == fp32_bytes - saved > 0
    assert model.layers[0].attention.q_map.weight.dtype == torch.bfloat16
    assert model.layers[0].attention.q_map.lora_A.weight.dtype == torch.float32
    assert model.output_logit_map.weight.dtype == torch.float32 and model.dtype == torch.float32
    exact = copy.deepcopy(model).double()
    slim_step(exact, windows(), L)

    def errors(C):
        model.zero_grad(set_to_none=True)
        slim_step(model, windows(), C, precision="bf16")
        for p in model.parameters():
            assert (p.grad is None) != p.requires_grad and (p.grad is None or p.grad.dtype == torch.float32)
        return {n: rel_err(p.grad, exact.get_parameter(n).grad) for n, p in model.named_parameters() if p.requires_grad}

    full, slim = errors(L), errors(16)
    assert max(full.values()) < 0.1  # bf16 is bf16
    for name, err in slim.items():
        assert err <= 2 * full[name] + 1e-3, f"{name}: SLiM {err:.2e}, full backprop {full[name]:.2e}"
    with torch.no_grad():  # outside autocast the bf16 maps compute as autocast would
        logits = model(windows()[:, :-1])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# -- fit with LoRA, end to end ------------------------------------------------------------------------------------


def _cli(capsys, *args):
    from slimtune.cli import main

    code = main([str(a) for a in args] + ["--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _base(tmp_path, dtype=torch.float32):
    from helpers import save_model

    model = tiny_model(dtype=torch.float32, hidden_dim=32, n_layers=2, ffn_dim=64, n_heads=2).to(dtype)
    return save_model(tmp_path / "base.safetensors", model)


def _fit(capsys, tmp_path, base, data_dir, *args, out="tuned.safetensors"):
    code, stdout, err = _cli(
        capsys, "fit", "--checkpoint", base, "--data", data_dir / "tinyshakespeare.txt", "--seq-len", 128,
        "--chunk-size", 32, "--steps", 3, "--lr", 0.01, "--out", tmp_path / out, "--json", *args,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(stdout.strip().splitlines()[-1])


def test_fit_with_lora_exports_the_merged_model_and_the_peft_adapter(capsys, tmp_path, data_dir):
    """--out: each target W + (ALPHA / R) B @ A (from the adapter file, computed here) in the input's dtype, every
    other tensor bit for bit the input's; the plain model loads it and gives the adapted model's logits."""
    from slimtune.checkpoint import load_checkpoint
    from slimtune.pretrained import PerformerLM

    base = _base(tmp_path)
    result = _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 2, "--lora-alpha", 3, "--lora-targets",
                  "q_map,V_map", "--adapter-out", tmp_path / "adapter")  # fmt: skip
    assert result["lora_rank"] == 2
    assert result["trainable_parameters"] == 2 * (2 * (32 + 32) + 2 * (64 + 32))  # layers x (q: 32->32, V: 64->32)
    assert result["final_loss"] < result["loss"]
    before, after = load_checkpoint(base), load_checkpoint(tmp_path / "tuned.safetensors")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert after.tensors.keys() == before.tensors.keys() and after.config == before.config
    changed = 0
    for name, w in before.tensors.items():
        got = after.tensors[name]
        assert got.dtype == w.dtype and got.shape == w.shape
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{prefix}.lora_A.weight" not in adapter:
            assert torch.equal(got, w), f"{name} changed"
            continue
        A, B = adapter[f"{prefix}.lora_A.weight"].double(), adapter[f"{prefix}.lora_B.weight"].double()
        assert torch.allclose(got.double(), w.double() + 1.5 * B @ A, rtol=0, atol=1e-6), name
        changed += not torch.equal(got, w)
    assert changed == 4
    merged = PerformerLM.from_pretrained(tmp_path / "tuned.safetensors")
    adapted_model = lora.load_adapter(PerformerLM.from_pretrained(base), tmp_path / "adapter")
    ids = windows()[:, :64]
    assert_close(merged(ids), adapted_model(ids), 1e-5, "merged against base + adapter")


@pytest.mark.parametrize("base_dtype", ["bf16", "int8", "nf4"])
def test_a_bf16_or_quantized_base_exports_every_untouched_tensor_bit_for_bit(capsys, tmp_path, data_dir, base_dtype):
    """The frozen maps lived in bf16, int8 or nf4; the export re-reads them from the fp32 input rather than widening
    what was held. The target's merge is the input's weight plus (alpha / R) B A in fp32, B and A from the adapter
    written beside it. Each of these bases computes under bf16 autocast."""
    from slimtune.checkpoint import load_checkpoint

    base = _base(tmp_path)
    result = _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 4, "--lora-targets", "q_map", "--base-dtype",
                  base_dtype, "--adapter-out", tmp_path / "adapter")  # fmt: skip
    assert result["run"]["compute_dtype"] == "bfloat16"
    before, after = load_checkpoint(base), load_checkpoint(tmp_path / "tuned.safetensors")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for name, w in before.tensors.items():
        assert after.tensors[name].dtype == torch.float32, name
        if "q_map.weight" not in name:
            assert torch.equal(after.tensors[name], w), name
            continue
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
        assert torch.equal(after.tensors[name], w + (8 / 4) * (b @ a)), name
        assert not torch.equal(after.tensors[name], w), name  # the step moved the adapter


def test_a_resumed_lora_run_is_bit_for_bit_the_uninterrupted_one(capsys, tmp_path, data_dir):
    base = _base(tmp_path)
    _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 2, "--steps", 4, out="once.safetensors")
    _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 2, "--steps", 2, out="twice.safetensors")
    _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 2, "--steps", 4, "--resume", out="twice.safetensors")
    once, twice = load_file(str(tmp_path / "once.safetensors")), load_file(str(tmp_path / "twice.safetensors"))
    assert all(torch.equal(once[n], twice[n]) for n in once)
    code, _, err = _cli(capsys, "fit", "--checkpoint", base, "--data", data_dir / "tinyshakespeare.txt", "--seq-len",
                        128, "--chunk-size", 32, "--lr", 0.01, "--steps", 5, "--lora-rank", 3, "--resume", "--out",
                        tmp_path / "twice.safetensors")  # fmt: skip
    assert code == 2 and "was started with --lora-rank 2 (now 3)" in err.strip().splitlines()[-1]
    code, _, err = _cli(capsys, "fit", "--checkpoint", base, "--data", data_dir / "tinyshakespeare.txt", "--seq-len",
                        128, "--chunk-size", 32, "--lr", 0.01, "--steps", 5, "--lora-rank", 2, "--base-dtype", "nf4",
                        "--resume", "--out", tmp_path / "twice.safetensors")  # fmt: skip
    assert code == 2 and "was started with --base-dtype 'fp32' (now 'nf4')" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base-dtype", "bf16"], "needs LoRA: give --lora-rank"),
        (["--adapter-out", "ad"], "needs LoRA: give --lora-rank"),
        (["--lora-rank", 2, "--lora-targets", "q_map,out_proj"], "unknown out_proj"),
        (["--lora-rank", -1], "--lora-rank"),
        (["--lora-rank", 2, "--adapter-out", "OUT"], "same path as --out"),
    ],
)
def test_bad_lora_flags_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, data_dir, args, message):
    base = _base(tmp_path)
    out = tmp_path / "o.safetensors"
    args = [out if a == "OUT" else tmp_path / a if a == "ad" else a for a in args]
    code, _, err = _cli(capsys, "fit", "--checkpoint", base, "--data", data_dir / "tinyshakespeare.txt", "--seq-len",
                        64, "--out", out, *args)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


def test_one_step_adaptation_of_a_lora_model_steps_only_its_adapters(data_dir):
    from slimtune.data import read_bytes
    from slimtune.evaluation import adapt_one_step

    model = lora.add(tiny_model(dtype=torch.float32, hidden_dim=32, n_layers=2, ffn_dim=64), rank=2)
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    result = adapt_one_step(model, read_bytes(data_dir / "ptb.valid.txt")[:20_000], seq_len=64, windows=2, lr=0.5)
    assert result.bpc_after != result.bpc_before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # restored after the windows


def test_pretrain_refuses_lora_rather_than_ignoring_it(tmp_path):
    from slimtune import pretrain
    from slimtune.config import PerformerConfig

    config = PerformerConfig(vocab_size=256, hidden_dim=16, n_layers=1, ffn_dim=32, n_heads=2)
    with pytest.raises(ConfigError, match="LoRA adapts a pretrained base"):
        pretrain(config, None, tmp_path / "p.safetensors", task="copy", lora_rank=4, run_dir=None)
    assert list(tmp_path.iterdir()) == []


PEFT_LOAD = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
model = PeftModel.from_pretrained(base, sys.argv[2])
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[4])
print(type(model).__name__, model.peft_config["default"].r)
"""


def test_peft_loads_the_adapter_onto_the_hf_model_and_gives_the_merged_exports_logits(capsys, tmp_path, data_dir):
    """CONTRACT.md section 4: --adapter-out is PEFT's format. peft.PeftModel.from_pretrained puts it on the
    --format hf export of the base (transformers, in a clean process) and computes the merged --out's logits."""
    pytest.importorskip("peft", reason="peft is a test extra: pip install -e '.[test]'")
    import os
    import subprocess
    import sys

    from slimtune.pretrained import PerformerLM

    base = _base(tmp_path)
    _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 3, "--lora-targets", "q_map,v_map,U_map,output_logit_map",
         "--adapter-out", tmp_path / "adapter")  # fmt: skip
    hf_base = PerformerLM.from_pretrained(base).save_pretrained(tmp_path / "hf-base", format="hf")
    ids = windows()[:, :96]
    torch.save(ids, tmp_path / "ids.pt")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}  # no network, no shared cache
    run = subprocess.run(
        [sys.executable, "-c", PEFT_LOAD, str(hf_base), str(tmp_path / "adapter"), str(tmp_path / "ids.pt"),
         str(tmp_path / "logits.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["PeftModelForCausalLM", "3"]
    with torch.no_grad():
        merged = PerformerLM.from_pretrained(tmp_path / "tuned.safetensors")(ids)
        unadapted = PerformerLM.from_pretrained(base)(ids)
    theirs = torch.load(tmp_path / "logits.pt")
    scale = merged.abs().max().item()
    assert (merged - unadapted).abs().max().item() > 1e-3 * scale  # the adapter did change the model
    assert (theirs - merged).abs().max().item() <= 1e-4 * scale


def test_eval_adapts_lora_adapters_in_the_one_step_at_any_chunk_size(capsys, tmp_path, data_dir):
    """`eval --adapt one-step --lora-rank R`: the step trains adapters added as slimtune.lora.add adds them (same
    seed), the same after-bpc at C = 16 as with full backprop (SLiM's gradients are exact), and another one than
    the step over every weight."""
    from slimtune.data import read_bytes
    from slimtune.evaluation import adapt_one_step
    from slimtune.pretrained import PerformerLM

    base = _base(tmp_path)
    data = data_dir / "ptb.valid.txt"

    def cli_eval(*args):
        code, out, err = _cli(capsys, "eval", "--checkpoint", base, "--data", data, "--adapt", "one-step",
                              "--seq-len", 64, "--windows", 2, "--lr", 0.5, "--json", *args)  # fmt: skip
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])

    full, chunked = cli_eval("--lora-rank", 2, "--chunk-size", "full"), cli_eval("--lora-rank", 2, "--chunk-size", 16)
    every_weight = cli_eval("--chunk-size", "full")
    model = lora.add(PerformerLM.from_pretrained(base), rank=2, seed=0)
    tokens = read_bytes(data, min_length=2)
    expected = adapt_one_step(model, tokens, seq_len=64, windows=2, lr=0.5, chunk_size="full")
    assert full["bpc_before"] == expected.bpc_before
    assert abs(full["bpc_after"] - expected.bpc_after) <= 1e-6
    assert abs(chunked["bpc_after"] - full["bpc_after"]) <= 1e-5 and chunked["chunk_size"] == 16
    assert full["bpc_after"] != full["bpc_before"] and abs(every_weight["bpc_after"] - full["bpc_after"]) > 1e-4


def test_eval_refuses_lora_flags_without_the_one_step(capsys, tmp_path, data_dir):
    base = _base(tmp_path)
    code, out, err = _cli(capsys, "eval", "--checkpoint", base, "--data", data_dir / "ptb.valid.txt",
                          "--lora-rank", 4)  # fmt: skip
    assert code == 2 and out == "" and "--lora-rank sets what the one step trains" in err and err.count("\n") == 1


def test_a_lora_run_state_keeps_the_adapters_and_names_its_base(capsys, tmp_path, data_dir):
    """The run state of a LoRA run holds the adapters (not the frozen base) and the base file's sha256; a resume
    on another base is refused, the same base continues."""
    import hashlib

    from helpers import save_model

    base = _base(tmp_path)
    _fit(capsys, tmp_path, base, data_dir, "--lora-rank", 2, "--steps", 2, out="t.safetensors")
    state = torch.load(tmp_path / "t.safetensors.run" / "state.pt", weights_only=True)
    assert state["model"] and all(".lora_A." in n or ".lora_B." in n for n in state["model"])
    assert state["base_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    save_model(base, tiny_model(dtype=torch.float32, hidden_dim=32, n_layers=2, ffn_dim=64, n_heads=2, seed=9))
    code, _, err = _cli(capsys, "fit", "--checkpoint", base, "--data", data_dir / "tinyshakespeare.txt", "--seq-len",
                        128, "--chunk-size", 32, "--lr", 0.01, "--steps", 3, "--lora-rank", 2, "--resume", "--out",
                        tmp_path / "t.safetensors")  # fmt: skip
    assert code == 2 and "with the same --checkpoint" in err.strip().splitlines()[-1], err
