"""The optimizers `fit` offers (slimtune/optimizers.py): weight decay goes to the parameters with two or more
dimensions only and frozen parameters are left out; one step of each optimizer against the update written out by
hand (sgd with L2 decay, adamw's decoupled decay, adam's first step); names are checked like every choice."""

import pytest
import torch
from helpers import tiny_model

from slimtune.errors import ConfigError
from slimtune.optimizers import ADAMW_WEIGHT_DECAY, default_weight_decay, make_optimizer, param_groups


def _ids(params):
    return {id(p) for p in params}


def test_param_groups_decay_only_the_matrices():
    model = tiny_model(dtype=torch.float32)
    named = dict(model.named_parameters())
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    matrices = {n for n, p in named.items() if p.dim() >= 2}
    # By name: the embedding and every linear map's weight; never a bias or a layer norm's gain.
    maps = ("attention.q_map", "attention.k_map", "attention.v_map", "U_map", "V_map")
    layer_weights = {f"layers.{i}.{m}.weight" for i in range(2) for m in maps}
    assert matrices == {"input_map.weight", "output_logit_map.weight"} | layer_weights
    assert _ids(groups[0]["params"]) == {id(named[n]) for n in matrices}
    assert _ids(groups[1]["params"]) == {id(p) for n, p in named.items() if n not in matrices}
    assert all(n.endswith("bias") or "layernorm" in n for n in named if n not in matrices)


def test_param_groups_leave_frozen_parameters_out():
    model = tiny_model(dtype=torch.float32)
    frozen = {"input_map.weight", "layers.0.layernorm1.weight", "layers.1.U_map.bias"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    groups = param_groups(list(model.parameters()), 0.5)  # a list of parameters works as well as a module
    listed = _ids(groups[0]["params"]) | _ids(groups[1]["params"])
    named = dict(model.named_parameters())
    assert listed == {id(p) for n, p in named.items() if n not in frozen}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(named) - len(frozen)


def _one_step(name, weight_decay=None, lr=0.1):
    """A matrix and a bias with known gradients, one step of `name`; returns (before, after, grads)."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))
    before = (weight.detach().clone(), bias.detach().clone())
    weight.grad, bias.grad = torch.randn(3, 4), torch.randn(4)
    grads = (weight.grad.clone(), bias.grad.clone())
    make_optimizer(name, [weight, bias], lr, weight_decay).step()
    return before, (weight.detach(), bias.detach()), grads


def test_sgd_is_plain_with_l2_decay_on_the_matrix_only():
    (w0, b0), (w1, b1), (gw, gb) = _one_step("sgd", weight_decay=0.2, lr=0.1)
    torch.testing.assert_close(w1, w0 - 0.1 * (gw + 0.2 * w0))
    torch.testing.assert_close(b1, b0 - 0.1 * gb)
    (w0, b0), (w1, b1), (gw, gb) = _one_step("sgd", lr=0.1)  # no decay by default
    torch.testing.assert_close(w1, w0 - 0.1 * gw)


def test_adamw_decays_the_matrix_decoupled_and_by_default():
    """Adam's first step moves each element by lr * g / (|g| + eps) ~ lr * sign(g); adamw first shrinks the matrix
    by lr * 0.01 (its default decay), not the bias."""
    lr, eps = 0.1, 1e-8
    (w0, b0), (w1, b1), (gw, gb) = _one_step("adamw", lr=lr)
    torch.testing.assert_close(w1, w0 * (1 - lr * 0.01) - lr * gw / (gw.abs() + eps))
    torch.testing.assert_close(b1, b0 - lr * gb / (gb.abs() + eps))
    (w0, _), (w1, _), (gw, _) = _one_step("adam", lr=lr)  # adam: no decay unless asked
    torch.testing.assert_close(w1, w0 - lr * gw / (gw.abs() + eps))


def test_the_default_decay_and_the_optimizer_types():
    assert ADAMW_WEIGHT_DECAY == 0.01
    assert default_weight_decay("adamw") == 0.01 and default_weight_decay("adam") == 0.0
    assert default_weight_decay("sgd") == 0.0
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert type(make_optimizer("sgd", params, 1.0)) is torch.optim.SGD
    assert make_optimizer("sgd", params, 1.0).param_groups[0]["momentum"] == 0.0
    assert type(make_optimizer("adam", params, 1.0)) is torch.optim.Adam
    assert type(make_optimizer("adamw", params, 1.0)) is torch.optim.AdamW
    assert make_optimizer("adamw", params, 1.0, weight_decay=0.3).param_groups[0]["weight_decay"] == 0.3


def test_an_unknown_optimizer_names_the_parameter():
    for call in (lambda: make_optimizer("lion", [], 1.0), lambda: default_weight_decay("lion")):
        with pytest.raises(ConfigError, match="`optimizer` must be one of sgd, adam, adamw") as info:
            call()
        assert info.value.params == ("optimizer",)


def test_adafactor_keeps_factored_second_moments_and_decays_decoupled():
    """torch.optim.Adafactor through make_optimizer: per matrix a row and a column vector, per vector a full one
    (counted from the shapes here); weight decay on matrices only, decoupled (p *= 1 - lr * wd with zero grads)."""
    from slimtune.planner import measure_optimizer

    model = tiny_model("sqr", True, dtype=torch.float32)
    expected = sum(4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel() for p in model.parameters())
    assert measure_optimizer(model, "adafactor")[0] == expected < 8 * sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_optimizer("adafactor", model, lr=0.1, weight_decay=0.5).step()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        else:
            assert torch.equal(p, before[name]), name
