"""SLiM gradients against an independent float64 model (tests/reference.py) and against plain backprop.
(Batched weight gradients: test_deferred.py.)"""

import pytest
import reference
import torch
from helpers import assert_close, projections, tiny_model

from slimtune.errors import ConfigError
from slimtune.features import FEATURE_TYPES
from slimtune.slim import slim_step

L = 100  # not a multiple of 7 or 64, nor of the attention block size
FEATURES = [f for f in FEATURE_TYPES if f != "favor+_N"] + ["favor+_2"]
_cache = {}
# relu leaves some normalisers near zero, where the attention gradient (S - z out^T) / (phi(q) . z) cancels:
# here even plain fp32 backprop (C = L) is 7e-6 from float64, and any other summation order of the same fp32
# arithmetic (C = 1 with stored states, no subtraction at all) lands at 2e-5.
FP32_TOL = {"relu": 3e-5}


def windows_and_mask(B, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 256, (B, L + 1), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.6).double() if masked else None
    return windows, mask


def expected(feature, post, B, masked):
    """The float64 reference's loss and gradients, computed once per model and batch."""
    key = (feature, post, B, masked)
    if key not in _cache:
        model = tiny_model(feature, post)
        windows, mask = windows_and_mask(B, masked)
        _cache[key] = reference.loss_and_grads(
            model.state_dict(), model.config.to_dict(), windows, mask, projections(model)
        )
    return _cache[key]


def slim_grads(model, windows, mask, C, **kw):
    model.zero_grad(set_to_none=True)
    loss = slim_step(model, windows, C, mask, **kw)
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("C", [1, 7, 64, L], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("post", [True, False], ids=["postLN", "preLN"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_exact_against_float64_reference(dtype, feature, post, B, C, masked):
    ref_loss, ref_grads = expected(feature, post, B, masked)
    model = tiny_model(feature, post, dtype=dtype)
    windows, mask = windows_and_mask(B, masked)
    # relu features can leave a normaliser at exactly 0 + 1e-16, where any rounding residue of the paper's
    # subtraction is amplified ~1e16 times; float64 has no wider type to subtract in, so that case stores states.
    recovery = "store" if (feature == "relu" and dtype == torch.float64) else "subtract64"
    loss, grads = slim_grads(model, windows, mask, C, recovery=recovery)
    tol = 1e-10 if dtype == torch.float64 else FP32_TOL.get(feature, 1e-5)
    assert_close(loss, ref_loss, tol, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close(g, ref_grads[name], tol, f"grad {name}")


@pytest.mark.parametrize("recovery", ["subtract", "subtract64", "store"])
@pytest.mark.parametrize("C", [1, 13, 50])
def test_recovery_modes_match_backprop(recovery, C):
    model = tiny_model("elu+1", True)
    windows, mask = windows_and_mask(2, True, seed=3)
    full_loss, full = slim_grads(model, windows, mask, L)
    loss, grads = slim_grads(model, windows, mask, C, recovery=recovery)
    assert_close(loss, full_loss, 1e-12, "loss")
    for name in full:
        assert_close(grads[name], full[name], 1e-11, name)


def test_grads_accumulate_like_backward():
    model = tiny_model("sqr", True)
    windows, _ = windows_and_mask(1, False)
    _, once = slim_grads(model, windows, None, 7)
    once = {k: v.clone() for k, v in once.items()}
    slim_step(model, windows, 7)
    for name, p in model.named_parameters():
        assert_close(p.grad, 2 * once[name], 1e-12, name)


def test_favor_draw_is_shared_by_all_chunks():
    """With a new draw between chunks the gradient would differ from full backprop; one draw per step keeps it exact,
    and a new draw changes the loss (so the draw is really used)."""
    model = tiny_model("favor+", True)
    windows, _ = windows_and_mask(1, False)
    full_loss, full = slim_grads(model, windows, None, L)
    loss, grads = slim_grads(model, windows, None, 9)
    assert_close(loss, full_loss, 1e-12, "loss")
    model.redraw_features(torch.Generator().manual_seed(99))
    assert abs(slim_grads(model, windows, None, L)[0] - full_loss) > 1e-6


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "plain"])
def test_no_chunk_graph_outlives_its_backward(batched, monkeypatch):
    """Every chunk's graph is freed after its backward: the start states it was built on are gone once the step
    returns (an earlier way of deferring weight gradients kept every graph alive: 1 MB per chunk at d 256)."""
    import gc
    import weakref

    from slimtune import slim

    model = tiny_model("sqr", True)
    windows, _ = windows_and_mask(1, False)
    real, kept = slim._recompute, []

    def watched(*args, **kw):
        logits, exact, leaves, ends = real(*args, **kw)
        kept.extend(weakref.ref(t) for t in leaves + ends)
        return logits, exact, leaves, ends

    monkeypatch.setattr(slim, "_recompute", watched)
    slim_step(model, windows, 7, batch_weight_grads=batched)
    gc.collect()
    assert len(kept) == 2 * 2 * -(-L // 7)  # leaves and end states, 2 layers, every chunk
    assert [r for r in kept if r() is not None] == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(chunk_size=0), "chunk size"),
        (dict(chunk_size=-3), "chunk size"),
        (dict(windows=torch.zeros(2, 1, dtype=torch.long)), "L >= 1"),
        (dict(windows=torch.zeros(5, dtype=torch.long)), "L >= 1"),
        (dict(windows=torch.zeros(2, 9)), "integer"),
        (dict(windows=torch.full((1, 9), 300)), "token ids"),
        (dict(mask=torch.ones(2, 7)), "mask has shape"),
        (dict(mask=torch.zeros(1, 8)), "keeps no position"),
        (dict(recovery="magic"), "state recovery"),
    ],
)
def test_bad_arguments_raise_clear_errors(bad, message):
    model = tiny_model("sqr", True)
    args = dict(windows=torch.zeros(1, 9, dtype=torch.long), chunk_size=4, mask=None, recovery="subtract64")
    args.update(bad)
    with pytest.raises(ConfigError, match=message):
        slim_step(model, args["windows"], args["chunk_size"], args["mask"], recovery=args["recovery"])


FROZEN = {
    "layer 2 and the output map train": lambda name: not (name.startswith("layers.1.") or name.startswith("output")),
    "the embedding and layer 1 frozen": lambda name: name.startswith(("input_map", "layers.0.")),
    "only layer norms train": lambda name: "layernorm" not in name,
}


@pytest.mark.parametrize("frozen", FROZEN.values(), ids=FROZEN.keys())
@pytest.mark.parametrize("C", [1, 7, 64, L], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("post", [True, False], ids=["postLN", "preLN"])
@pytest.mark.parametrize("feature", ["sqr", "favor+"])
def test_frozen_parameters_get_no_gradient_and_the_rest_the_reference_ones(feature, post, C, frozen):
    """Any subset frozen (requires_grad False): SLiM at every C gives the trainable parameters the float64
    reference's gradients and the frozen ones none (an end state that leads to no trainable parameter once made
    the backward over the states fail: "element 1 of tensors does not require grad")."""
    ref_loss, ref_grads = expected(feature, post, 3, True)
    model = tiny_model(feature, post, dtype=torch.float64)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen(name))
    windows, mask = windows_and_mask(3, True)
    loss, grads = slim_grads(model, windows, mask, C)
    assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and len(trained) < len(grads)
    for name, grad in grads.items():
        if name in trained:
            assert_close(grad, ref_grads[name], 1e-10, name)
        else:
            assert grad is None, name


def test_a_model_with_nothing_to_train_is_refused():
    model = tiny_model("sqr", True, dtype=torch.float32)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        slim_step(model, windows_and_mask(1, False)[0], 8)
