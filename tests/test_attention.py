"""The blockwise attention op against its naive twin and a per-token loop, on outputs and all gradients."""

import pytest
import torch
from helpers import assert_close

from slimtune.attention import causal_linear_attention, naive_causal_linear_attention, state_contribution


def make_inputs(B, H, T, M, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(B, H, T, M, generator=g, dtype=dtype)
    fk = torch.rand(B, H, T, M, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    state = torch.rand(B, H, M, D + 1, generator=g, dtype=dtype) * 3
    return [t.requires_grad_() for t in (fq, fk, v, state)]


def loop_attention(fq, fk, v, state):
    """Per-token prefix sums, written out."""
    D = v.shape[-1]
    S, z = state[..., :D], state[..., D]
    outs = []
    for t in range(fq.shape[2]):
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + fk[:, :, t]
        outs.append((fq[:, :, t, :, None] * S).sum(-2) / ((fq[:, :, t] * z).sum(-1, keepdim=True) + 1e-16))
    return torch.stack(outs, 2), torch.cat([S, z[..., None]], -1)


def grads_of(fn, inputs, seed=1):
    out, final = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_final = torch.randn(final.shape, generator=g, dtype=final.dtype)
    scalar = (out * w_out).sum() + (final * w_final).sum()
    return out, final, torch.autograd.grad(scalar, inputs)


@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("block", [1, 16, 64], ids=lambda b: f"block{b}")
def test_blockwise_matches_loop(T, block):
    inputs = make_inputs(2, 3, T, 6, 5)
    fast = lambda *a: causal_linear_attention(*a, block_size=block)  # noqa: E731
    out, final, grads = grads_of(fast, inputs)
    ref_out, ref_final, ref_grads = grads_of(loop_attention, inputs)
    assert_close(out, ref_out, 1e-12, "out")
    assert_close(final, ref_final, 1e-12, "final state")
    for name, g, rg in zip(("fq", "fk", "v", "state"), grads, ref_grads, strict=True):
        assert_close(g, rg, 1e-12, f"grad {name}")


@pytest.mark.parametrize("T", [7, 130])
def test_naive_twin_matches_loop(T):
    inputs = make_inputs(1, 2, T, 4, 3)
    out, final, grads = grads_of(naive_causal_linear_attention, inputs)
    ref_out, ref_final, ref_grads = grads_of(loop_attention, inputs)
    assert_close(out, ref_out, 1e-12, "out")
    assert_close(final, ref_final, 1e-12, "final")
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, 1e-12, "grad")


def test_fp32_matches_float64():
    inputs = make_inputs(2, 2, 300, 8, 8)
    out, final = causal_linear_attention(*[t.detach().float() for t in inputs])
    ref_out, ref_final = loop_attention(*[t.detach() for t in inputs])
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(final, ref_final, 1e-6, "final")


def test_chunks_compose():
    """Running two halves with the carried state equals one pass: the property SLiM rests on."""
    fq, fk, v, state = [t.detach() for t in make_inputs(1, 2, 100, 4, 3)]
    whole, whole_final = causal_linear_attention(fq, fk, v, state)
    a, mid = causal_linear_attention(fq[:, :, :37], fk[:, :, :37], v[:, :, :37], state)
    b, final = causal_linear_attention(fq[:, :, 37:], fk[:, :, 37:], v[:, :, 37:], mid)
    assert_close(torch.cat([a, b], 2), whole, 1e-13, "out")
    assert_close(final, whole_final, 1e-13, "final")


# Lengths on both sides of the default block size (64): T <= 64 takes the one-block fast path of
# causal_linear_attention and state_contribution, T > 64 the blockwise path with padding (65, 150, 500 are not
# multiples of 64).
LENGTHS = [1, 7, 63, 64, 65, 150, 500]


@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_default_block_size_matches_naive_twin(T):
    """The op as the model calls it (default block size) against the explicit prefix sums, from a non-zero start
    state: outputs, final state, and the gradients of all four inputs."""
    inputs = make_inputs(2, 3, T, 6, 5, seed=T)
    assert inputs[3].detach().abs().min() > 0  # a start state that is really carried
    out, final, grads = grads_of(causal_linear_attention, inputs)
    ref_out, ref_final, ref_grads = grads_of(naive_causal_linear_attention, inputs)
    assert out.shape == (2, 3, T, 5) and final.shape == (2, 3, 6, 6)
    assert_close(out, ref_out, 1e-12, "out")
    assert_close(final, ref_final, 1e-12, "final state")
    for name, g, rg in zip(("fq", "fk", "v", "state"), grads, ref_grads, strict=True):
        assert_close(g, rg, 1e-12, f"grad {name}")


@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_state_contribution_is_the_sum_of_outer_products(T):
    """sum_s phi(k_s) [v_s, 1]^T, written as an einsum, and final state - start state of the attention op."""
    fq, fk, v, start = [t.detach() for t in make_inputs(2, 3, T, 6, 5, seed=T)]
    expected = torch.cat([torch.einsum("bhtm,bhtd->bhmd", fk, v), fk.sum(2).unsqueeze(-1)], dim=-1)
    contribution = state_contribution(fk, v)
    assert contribution.shape == (2, 3, 6, 6)
    assert_close(contribution, expected, 1e-12, "contribution")
    _, final = naive_causal_linear_attention(fq, fk, v, start)
    assert_close(contribution, final - start, 1e-12, "final - start")


@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_state_contribution_undoes_the_chunk_exactly(T):
    """final - contribution recovers the start state bit for bit when the state is float64 and the features fp32."""
    fq, fk, v, _ = [t.detach().float() for t in make_inputs(2, 2, T, 8, 8, seed=T)]
    start = torch.rand(2, 2, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(T)) * 3
    _, final = causal_linear_attention(fq, fk, v, start)
    assert final.dtype == torch.float64
    assert not torch.equal(final.float(), start.float())  # the chunk added something
    recovered = final - state_contribution(fk, v).double()
    assert torch.equal(recovered.float(), start.float())


def test_no_per_token_outer_products_saved():
    """Autograd keeps nothing of size T x M x D (naive form keeps exactly that)."""
    B, H, T, M, D = 1, 2, 1024, 32, 32
    fq, fk, v, state = make_inputs(B, H, T, M, D, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_linear_attention(fq, fk, v, state)
    assert max(sizes) < B * H * T * M * D / 4, f"largest saved tensor has {max(sizes)} elements"
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_causal_linear_attention(fq, fk, v, state)
    assert max(sizes) >= B * H * T * M * D  # the check above would notice outer products
