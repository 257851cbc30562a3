"""Large vocabularies at O(C) memory (slim.py's `_output_loss`, Performer.loss_tile): a chunk's output map and
loss run over tiles of positions when its logits would exceed model.LOGITS_TILE_BYTES. The gradients stay exact:
checked against the float64 reference (tests/reference.py), at vocabularies, chunk sizes and tile sizes that do not
divide each other, with a mask, with LoRA on the output map, under bf16 autocast against the untiled step; and the
memory a chunk holds, counted, stays flat as the vocabulary grows."""

import pytest
import reference
import torch
from helpers import assert_close, projections, rel_err, tiny_model

from slimtune import evaluation, lora
from slimtune import model as model_module
from slimtune.memory import TensorBytes
from slimtune.slim import slim_step

L = 60


def _tile(monkeypatch, positions: int, batch: int, vocab: int) -> None:
    """Make Performer.loss_tile give `positions` for this batch and vocabulary (fp32 logits: 4 bytes each)."""
    monkeypatch.setattr(model_module, "LOGITS_TILE_BYTES", positions * batch * vocab * 4)


def _data(B: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, V, (B, L + 1), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.6).double()
    return windows, mask


def _grads(model, windows, mask, C, **kw):
    model.zero_grad(set_to_none=True)
    loss = slim_step(model, windows, C, mask, **kw)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("V, C, tile", [(300, 7, 3), (300, 25, 7), (1000, 60, 11), (1000, 16, 16), (513, 60, 59)])
@pytest.mark.parametrize("B", [1, 2])
def test_tiled_gradients_are_the_references(monkeypatch, V, C, tile, B):
    model = tiny_model("elu+1", True, dtype=torch.float64, vocab_size=V, seed=4)
    windows, mask = _data(B, V)
    ref_loss, ref_grads = reference.loss_and_grads(
        model.state_dict(), model.config.to_dict(), windows, mask, projections(model)
    )
    _tile(monkeypatch, tile, B, V)
    assert model.loss_tile(B) == tile  # the case under test is tiled as intended
    loss, grads = _grads(model, windows, mask, C)
    assert_close(loss, ref_loss, 1e-10, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close(g, ref_grads[name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("tile", [1, 5, 13])
def test_tiled_lora_on_the_output_map_matches_the_untiled_step(monkeypatch, tile):
    """Adapters on every map, the output map's included, frozen base: every adapter gradient as the untiled step's
    (which the LoRA tests check against the reference)."""
    model = tiny_model("sqr", True, dtype=torch.float64, vocab_size=400, seed=6)
    lora.add(model, rank=2, targets=lora.LORA_TARGETS, seed=1)
    for p in model.parameters():  # lora_B starts at zero: move it so every adapter gradient is non-trivial
        if p.requires_grad:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    windows, mask = _data(2, 400, seed=1)
    plain_loss, plain = _grads(model, windows, mask, 20)
    _tile(monkeypatch, tile, 2, 400)
    loss, tiled = _grads(model, windows, mask, 20)
    assert_close(loss, plain_loss, 1e-12, "loss")
    assert tiled.keys() == plain.keys() and any("output_logit_map.lora" in n for n in tiled)
    for name, g in tiled.items():
        assert_close(g, plain[name], 1e-10, f"grad {name}")


def test_tiled_bf16_autocast_is_as_close_to_fp32_as_the_untiled_step(monkeypatch):
    """Under bf16 autocast each tile's products round to bf16 on their own: the tiled gradients lie as close to the
    fp32 step's as the untiled ones do (within 2x of their error), not bit for bit equal to them."""
    model = tiny_model("sqr", True, dtype=torch.float32, vocab_size=700, seed=7)
    windows, mask = _data(2, 700, seed=2)
    exact_loss, exact = _grads(model, windows, mask, 30)
    plain_loss, plain = _grads(model, windows, mask, 30, precision="bf16")
    _tile(monkeypatch, 9, 2, 700)
    loss, tiled = _grads(model, windows, mask, 30, precision="bf16")
    assert abs(loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + 1e-6 * abs(exact_loss)
    for name, g in tiled.items():
        untiled_error = rel_err(plain[name], exact[name])
        assert rel_err(g, exact[name]) <= 2 * untiled_error + 1e-6, name


def test_eval_scores_tiled_as_untiled(monkeypatch):
    model = tiny_model("elu+1", True, dtype=torch.float64, vocab_size=900, seed=8)
    windows, _ = _data(3, 900, seed=3)
    plain = evaluation.position_nll(model, windows, 25)
    _tile(monkeypatch, 6, 3, 900)
    assert torch.allclose(evaluation.position_nll(model, windows, 25), plain, rtol=1e-12, atol=0)


def test_a_chunk_holds_the_tile_s_logits_not_the_chunk_s(monkeypatch):
    """Counted tensor bytes of a step's peak: at V = 32000 the untiled chunk holds [B, C, V] logits and their
    gradient; tiled, what grows with V is the output map's gradient and one tile's logits."""
    peaks = {}
    for V in (256, 32000):
        model = tiny_model("sqr", True, dtype=torch.float32, vocab_size=V, hidden_dim=32, ffn_dim=64, n_heads=2)
        windows, _ = _data(1, V)
        for tiled in (False, True):
            monkeypatch.setattr(model_module, "LOGITS_TILE_BYTES", 16 * 4 * V if tiled else 2**40)
            model.zero_grad(set_to_none=True)
            with TensorBytes() as counted:
                slim_step(model, windows, L)
            peaks[V, tiled] = counted.peak
    grads = 32000 * (32 + 1) * 4  # the output map's weight and bias gradients (the weights exist before)
    logits = L * 32000 * 4
    untiled = peaks[32000, False] - peaks[256, False] - grads
    tiled = peaks[32000, True] - peaks[256, True] - grads
    assert untiled > 2 * logits  # the chunk's logits and their gradient, whole
    assert tiled <= 1.5 * untiled * 16 / L  # one tile's of 16 positions: in proportion to its share of the chunk


def test_eval_plans_the_larger_of_the_tile_and_the_layers_transients():
    """Eval without gradients: a tile's logits exist after the layers' transients are gone, so the forward's peak is
    the larger of two lines. Probed at small C the tile dominates; at large C the feed-forward's transients do, and
    one line through the forward's probes falls short of the peak counted there (tensor bytes); the plan's second
    probe of the layers alone covers it."""
    from functools import partial

    from slimtune.eval_plan import ForwardWork, measure, predict

    model = tiny_model("sqr", True, dtype=torch.float32, vocab_size=32000, hidden_dim=32, ffn_dim=2048, n_heads=2)
    C = 8192
    windows = torch.randint(0, 32000, (1, C + 1), generator=torch.Generator().manual_seed(0))
    with TensorBytes() as counted:
        evaluation.position_nll(model, windows, C)
    forward = partial(evaluation.position_nll, model)
    alone = measure(model, forward, C)
    both = (alone, measure(model, partial(evaluation.layers_only, model), C))
    work = ForwardWork(C)
    one_line = predict(model, alone, 0, work, C, 1, heap="fast").chunk
    two_lines = predict(model, both, 0, work, C, 1, heap="fast").chunk
    assert one_line < counted.peak <= two_lines
