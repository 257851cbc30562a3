"""Every recipe loads and validates; flags override recipe values; the copy task's data and mask are right."""

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.data import COPY_SEPARATOR, copy_windows
from slimtune.errors import ConfigError
from slimtune.recipes import list_recipes, load_recipe
from slimtune.slim import slim_step
from slimtune.model import PerformerLM

PAPER = {"config-1": (8192, 1, 1024), "config-2": (1024, 3, 512), "config-3": (4096, 3, 1024), "config-4": (16384, 3, 1024)}


def test_every_recipe_loads_and_builds():
    found = {r.path.stem: r for r in list_recipes()}
    assert {"small", "copy", *PAPER} <= found.keys()
    for name, recipe in found.items():
        first = recipe.path.read_text().splitlines()[0]
        assert first.startswith("# slimtune pretrain --recipe recipes/"), name
        model = PerformerLM(recipe.model.__class__(**{**recipe.model.to_dict(), "hidden_dim": 16, "ffn_dim": 8, "n_heads": 2}))
        assert sum(p.numel() for p in model.parameters()) > 0
    for name, (L, layers, d) in PAPER.items():
        r = found[name]
        assert (r.train["seq_len"], r.model.n_layers, r.model.hidden_dim) == (L, layers, d)
        assert (r.model.ffn_dim, r.model.n_heads, r.model.feature_type, r.train["batch_size"]) == (4 * d, d // 64, "sqr", 1)


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


def test_copy_windows():
    windows, mask = copy_windows(3, 20, 5, torch.Generator().manual_seed(0))
    assert windows.shape == (3, 21) and mask.shape == (3, 20)
    assert torch.equal(windows[:, :10], windows[:, 11:21]) and (windows[:, 10] == COPY_SEPARATOR).all()
    assert windows[:, :10].min() >= 1 and windows[:, :10].max() <= 5
    targets = windows[:, 1:]
    assert torch.equal(targets[mask.bool()].view(3, 10), windows[:, :10])  # the mask keeps exactly the copy


def test_pretrain_flags_override_recipe(capsys, tmp_path):
    out = tmp_path / "copy.safetensors"
    code = main(["pretrain", "--recipe", "copy", "--out", str(out), "--hidden-dim", "32", "--n-heads", "2",
                 "--seq-len", "24", "--steps", "3", "--batch-size", "2", "--chunk-size", "5", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert (result["seq_len"], result["steps"], result["chunk_size"]) == (24, 3, 5)
    assert 0.0 <= result["metrics"]["copy_accuracy"] <= 1.0
    code = main(["inspect", str(out), "--json"])
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]
    assert (config["hidden_dim"], config["ffn_dim"], config["n_heads"], config["n_layers"]) == (32, 128, 2, 1)


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
