"""Every recipe loads and validates; flags override recipe values; the copy task's mask counts only the copy
(its windows: test_data.py)."""

import json

import pytest
import torch

from slimtune.checkpoint import load_checkpoint
from slimtune.cli import main
from slimtune.data import copy_windows
from slimtune.errors import ConfigError
from slimtune.pretrained import PerformerLM
from slimtune.recipes import list_recipes, load_recipe
from slimtune.slim import slim_step

PAPER = {
    "config-1": (8192, 1, 1024),
    "config-2": (1024, 3, 512),
    "config-3": (4096, 3, 1024),
    "config-4": (16384, 3, 1024),
}


def hand_count(V, d, F, n_layers):
    """Parameters of the contract's model, counted from its tensor list: the embedding [V, d/2]; per layer
    q, k, v maps (d x d + d each), U (F x d + F), V (d x F + d) and two layer norms (2 d each); the output map."""
    per_layer = 3 * (d * d + d) + (F * d + F) + (d * F + d) + 4 * d
    return V * d // 2 + n_layers * per_layer + V * d + V


def test_every_recipe_loads_and_builds():
    found = {r.path.stem: r for r in list_recipes()}
    assert {"small", "copy", *PAPER} <= found.keys()
    for name, recipe in found.items():
        first = recipe.path.read_text().splitlines()[0]
        assert first.startswith("# slimtune pretrain --recipe recipes/"), name
        config = recipe.model.__class__(**{**recipe.model.to_dict(), "hidden_dim": 16, "ffn_dim": 8, "n_heads": 2})
        model = PerformerLM(config)
        assert sum(p.numel() for p in model.parameters()) == hand_count(config.vocab_size, 16, 8, config.n_layers), name
    for name, (L, layers, d) in PAPER.items():
        r = found[name]
        assert (r.train["seq_len"], r.model.n_layers, r.model.hidden_dim) == (L, layers, d)
        assert (r.model.ffn_dim, r.model.n_heads, r.model.feature_type, r.train["batch_size"]) == (
            4 * d,
            d // 64,
            "sqr",
            1,
        )


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden_dim = 10\n")
    with pytest.raises(ConfigError, match="lacks"):
        load_recipe(bad)
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")


def test_pretrain_flags_override_recipe(capsys, tmp_path):
    out = tmp_path / "copy.safetensors"
    code = main(
        [
            "pretrain",
            "--recipe",
            "copy",
            "--out",
            str(out),
            "--hidden-dim",
            "32",
            "--n-heads",
            "2",
            "--seq-len",
            "24",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--chunk-size",
            "5",
            "--lr",
            "0.03",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert (result["seq_len"], result["steps"], result["chunk_size"]) == (24, 3, 5)
    code = main(["inspect", str(out), "--json"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = info["config"]
    assert (config["hidden_dim"], config["ffn_dim"], config["n_heads"], config["n_layers"]) == (32, 128, 2, 1)
    assert info["parameters"] == hand_count(256, 32, 128, 1)
    exported = load_checkpoint(out)
    run = json.loads(exported.metadata["slimtune_provenance"])
    assert (run["task"], run["optimizer"], run["lr"], run["batch_size"]) == ("copy", "adam", 0.03, 2)  # recipe + flags
    # The reported accuracy, recomputed from the exported weights: the share of the copy positions (the mask)
    # where the argmax of the logits is the target, over the held-out draw (4 batches of 8 sequences, seeded
    # with --seed + 1 = 1, with the recipe's 16 symbols). lr 0.03 takes the model off chance (~0.08 here, where
    # every draw scores differently), so a score on other sequences or other weights would not match.
    model = PerformerLM(exported.config)
    model.load_state_dict(exported.tensors)
    generator = torch.Generator().manual_seed(1)
    hits = total = 0
    with torch.no_grad():
        for _ in range(4):
            windows, mask = copy_windows(8, 24, 16, generator)
            assert mask.sum() == 8 * 12
            right = model(windows[:, :-1]).argmax(-1) == windows[:, 1:]
            hits += int(right[mask.bool()].sum())
            total += int(mask.sum())
    assert result["metrics"]["copy_accuracy"] == pytest.approx(hits / total, abs=1e-12)


def test_copy_task_mask_counts_only_the_copy():
    """SLiM with the copy mask equals the mean loss over the copy positions, computed directly."""
    recipe = load_recipe("copy")
    config = recipe.model.__class__(**{**recipe.model.to_dict(), "hidden_dim": 16, "ffn_dim": 32, "n_heads": 2})
    torch.manual_seed(0)
    model = PerformerLM(config).double()
    windows, mask = copy_windows(2, 30, 8, torch.Generator().manual_seed(1))
    loss = slim_step(model, windows, 7, mask)
    logp = torch.log_softmax(model(windows[:, :-1]), -1).gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert abs(loss - (-(logp * mask).sum() / mask.sum()).item()) < 1e-12
