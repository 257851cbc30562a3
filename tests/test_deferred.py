"""Batched weight gradients (slimtune/deferred.py): a DeferredLinear is an nn.Linear (same parameters, state_dict
and output); while a WeightGradBatcher is attached, backward leaves the weight gradients to the batcher, which
applies them in products of at most `rows` rows and on exit leaves in .grad what plain autograd (float64) puts
there; frozen parameters are skipped; inside SLiM steps against the float64 reference (tests/reference.py) with a
spy counting the products; and the buffer size and the one decision when a step batches."""

import pytest
import reference
import torch
from helpers import assert_close, projections, tiny_model
from torch import nn

from slimtune import deferred
from slimtune.deferred import DEFER_ROWS, DeferredLinear, WeightGradBatcher, buffer_bytes, defers, use_batching
from slimtune.slim import slim_step

L = 100  # not a multiple of 7 or 64, nor of the attention block size


def windows_and_mask(B, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 256, (B, L + 1), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.6).double() if masked else None
    return windows, mask


def slim_grads(model, windows, mask, C, **kw):
    model.zero_grad(set_to_none=True)
    loss = slim_step(model, windows, C, mask, **kw)
    return loss, {name: p.grad for name, p in model.named_parameters()}


class TwoMaps(nn.Module):
    """x -> DeferredLinear -> tanh -> DeferredLinear, a small net to run chunk by chunk."""

    def __init__(self, bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = DeferredLinear(6, 5, bias=bias).double(), DeferredLinear(5, 3, bias=bias).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _plain_grads(net, chunks):
    """The same loss by plain autograd with ordinary nn.Linear maps holding the same tensors."""
    a, b = nn.Linear(6, 5, bias=net.a.bias is not None).double(), nn.Linear(5, 3, bias=net.b.bias is not None).double()
    a.load_state_dict(net.a.state_dict())
    b.load_state_dict(net.b.state_dict())
    loss = sum((b(torch.tanh(a(x))) ** 2).sum() for x in chunks)
    loss.backward()
    return {"a.weight": a.weight.grad, "b.weight": b.weight.grad} | (
        {"a.bias": a.bias.grad, "b.bias": b.bias.grad} if a.bias is not None else {}
    )


def test_a_deferred_linear_is_an_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(6, 4)
    deferred_map = DeferredLinear(6, 4)
    deferred_map.load_state_dict(plain.state_dict())
    assert isinstance(deferred_map, nn.Linear) and deferred_map.state_dict().keys() == {"weight", "bias"}
    x = torch.randn(3, 6)
    assert torch.equal(deferred_map(x), plain(x))
    with WeightGradBatcher(deferred_map):  # attached, the output is the same
        assert torch.equal(deferred_map(x.requires_grad_()), plain(x))


@pytest.mark.parametrize("rows, chunk, n_chunks", [(16, 3, 10), (4, 3, 5), (8, 8, 3), (2, 5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_batched_step_gives_the_weight_gradients_of_plain_autograd(rows, chunk, n_chunks, bias):
    """Chunk by chunk backward with a batcher attached (each chunk's input needs a gradient, as SLiM's do): on exit
    .grad equals plain autograd's; chunks larger than `rows` are applied at once, smaller ones collected."""
    net = TwoMaps(bias)
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(chunk, 6, generator=g, dtype=torch.float64) for _ in range(n_chunks)]
    expected = _plain_grads(net, chunks)
    with WeightGradBatcher(net, rows=rows) as batcher:
        for x in chunks:
            x = x.clone().requires_grad_()
            (net(x) ** 2).sum().backward()
            assert x.grad is not None  # dL/dx is computed at once
        assert set(batcher.slots) == {id(net.a), id(net.b)}
    assert net.a.batcher is None and net.b.batcher is None and batcher.slots == {}
    for name, p in net.named_parameters():
        assert_close(p.grad, expected[name], 1e-14, name)


def test_gradients_accumulate_into_existing_grads():
    net = TwoMaps()
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    once = _plain_grads(net, [x])
    for p in net.parameters():
        p.grad = None
    (net(x.clone().requires_grad_()) ** 2).sum().backward()  # plain first ...
    with WeightGradBatcher(net, rows=64):
        (net(x.clone().requires_grad_()) ** 2).sum().backward()  # ... then batched on top
    for name, p in net.named_parameters():
        assert_close(p.grad, 2 * once[name], 1e-14, name)


def test_an_error_inside_drops_the_collected_rows_and_detaches():
    net = TwoMaps()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        with WeightGradBatcher(net, rows=64):
            (net(x) ** 2).sum().backward()
            raise RuntimeError("CUDA out of memory")
    assert net.a.weight.grad is None and net.b.weight.grad is None  # nothing applied: the step is thrown away
    assert net.a.batcher is None and net.b.batcher is None
    (net(x) ** 2).sum().backward()  # plain autograd again
    assert net.a.weight.grad is not None


def test_inputs_without_gradient_take_plain_autograd():
    """The first map of a net whose input needs no gradient computes its weight gradient itself."""
    net = TwoMaps()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = _plain_grads(net, [x])
    for p in net.parameters():
        p.grad = None
    with WeightGradBatcher(net, rows=64) as batcher:
        (net(x) ** 2).sum().backward()
        assert net.a.weight.grad is not None  # at once, not deferred
        assert id(net.a) not in batcher.slots and id(net.b) in batcher.slots
    for name, p in net.named_parameters():
        assert_close(p.grad, expected[name], 1e-14, name)


def test_buffer_bytes_by_hand():
    net = TwoMaps()  # float64: 8 bytes a value; rows x (in + out) per map
    assert buffer_bytes(net, rows=10) == 10 * (6 + 5) * 8 + 10 * (5 + 3) * 8
    model = tiny_model(dtype=torch.float32)  # d 16, F 32, V 256: per layer q, k, v (16 + 16), U (16 + 32), V (32 + 16)
    per_layer = 3 * (16 + 16) + (16 + 32) + (32 + 16)
    assert buffer_bytes(model) == DEFER_ROWS * (2 * per_layer + (16 + 256)) * 4


def test_when_a_step_batches():
    assert DEFER_ROWS == 256
    assert defers(1, 16, 1024, None) and defers(15, 17, 1024, None)
    assert not defers(16, 16, 1024, None)  # B * C = 256 rows: a product of its own
    assert not defers(1, 1024, 1024, None) and not defers(1, 2048, 1024, None)  # one chunk: nothing to batch
    assert not defers(1, 16, 1024, torch.bfloat16)  # not under autocast
    assert use_batching(1, 16, 1024, None, None) and not use_batching(1, 16, 1024, None, False)
    assert not use_batching(16, 16, 1024, None, True)  # asked for, but not possible


# ---------------------------------------------------------------- inside SLiM steps (moved from test_slim.py)


@pytest.mark.parametrize("frozen", [("input_map.weight",), ("layers.0.attention.q_map.bias", "layers.1.V_map.weight")])
def test_batched_weight_gradients_with_frozen_parameters(frozen):
    """Frozen parameters get no gradient and the others the full-backprop one, batched or not: with the embedding
    frozen the first layer's inputs need no gradient (its maps then take plain autograd), a frozen bias or weight
    is skipped by the batcher."""
    model = tiny_model("elu+1", False)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    windows, mask = windows_and_mask(2, True, seed=5)
    full_loss, full = slim_grads(model, windows, mask, L)
    loss, grads = slim_grads(model, windows, mask, 7, batch_weight_grads=True)
    assert_close(loss, full_loss, 1e-12, "loss")
    for name, g in grads.items():
        if name in frozen:
            assert g is None and full[name] is None, name
        else:
            assert_close(g, full[name], 1e-11, name)


@pytest.fixture(scope="module")
def favor_reference():
    """The float64 reference's loss and gradients for the favor+ pre-LN model and a masked batch of 3."""
    model = tiny_model("favor+", False)
    windows, mask = windows_and_mask(3, True)
    return reference.loss_and_grads(model.state_dict(), model.config.to_dict(), windows, mask, projections(model))


@pytest.mark.parametrize("C", [1, 7, 64])
def test_batched_weight_gradients_equal_plain_autograd(C, monkeypatch, favor_reference):
    """slimtune/deferred.py applies weight gradients over many chunks at once: the same sums, so both ways agree
    with the float64 reference, and plain autograd is used when batching is turned off.

    A spy on the batcher proves the batching really happens: with B = 3 and L = 100, each of the 11 linear maps
    sees 300 rows, which in products of at most 256 rows (DEFER_ROWS) are 2 products, whatever C, against
    L / C chunks (100, 15, 2); every row goes through a batched product exactly once."""
    model, (windows, mask) = tiny_model("favor+", False), windows_and_mask(3, True)
    ref_loss, ref = favor_reference
    linears = [m for m in model.modules() if isinstance(m, deferred.DeferredLinear)]
    assert len(linears) == 2 * 5 + 1 and deferred.DEFER_ROWS == 256  # q, k, v, U, V per layer, and the output map
    n_chunks = -(-L // C)
    products, entered = [], []
    apply, enter = deferred._Slot._apply, deferred.WeightGradBatcher.__enter__

    def spy_apply(slot, x, g):
        products.append((id(slot.module), x.shape[0]))
        return apply(slot, x, g)

    def spy_enter(batcher):
        entered.append(batcher)
        return enter(batcher)

    monkeypatch.setattr(deferred._Slot, "_apply", spy_apply)
    monkeypatch.setattr(deferred.WeightGradBatcher, "__enter__", spy_enter)
    for batched in (True, False):
        products.clear()
        entered.clear()
        loss, grads = slim_grads(model, windows, mask, C, batch_weight_grads=batched)
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
        for name, g in grads.items():
            assert_close(g, ref[name], 1e-10, f"{name} batched={batched}")
        if not batched:
            assert entered == [] and products == [], "batch_weight_grads=False still used the batcher"
            continue
        assert len(entered) == 1, "batch_weight_grads=True did not attach a batcher"
        per_map = {id(m): [] for m in linears}
        for key, rows in products:
            per_map[key].append(rows)
        for m in linears:
            rows = per_map[id(m)]
            assert sum(rows) == 3 * L, f"{m}: {sum(rows)} rows applied, expected B * L = {3 * L}"
            assert len(rows) == 2, f"{m}: {len(rows)} weight-gradient products for {n_chunks} chunks, expected 2"
