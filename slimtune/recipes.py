"""Recipes: TOML files holding a model config and training settings, such as the SLiM paper's configurations.
They live in the top-level recipes/ folder of the source tree (each begins with the command that runs it); an
installed package carries copies (slimtune.recipe_files). `resolve` merges a recipe with overrides, the way
`slimtune pretrain` does with a recipe and options: options win over the recipe, the recipe over the defaults."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .choices import LayerNorm
from .config import PerformerConfig
from .errors import ConfigError
from .options import DEFAULT_RECIPE, chunk_request

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRAIN_KEYS = {"task", "copy_symbols", "seq_len", "batch_size", "steps", "optimizer", "lr", "chunk_size"}
# [train] keys a recipe leaves out
TRAIN_DEFAULTS = {
    "task": "text",
    "seq_len": 256,
    "batch_size": 8,
    "steps": 500,
    "optimizer": "adam",
    "lr": 2e-3,
    "chunk_size": "full",
}


def _search() -> list[Path]:
    """./recipes first (a user's own), then the package's copies, then the source tree's (editable installs)."""
    folders = [Path.cwd() / "recipes"]
    shipped = resources.files("slimtune") / "recipe_files"  # in a wheel; absent from an editable install
    if isinstance(shipped, Path):
        folders.append(shipped)
    folders.append(Path(__file__).resolve().parent.parent / "recipes")
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


@dataclass
class Recipe:
    path: Path
    description: str
    model: PerformerConfig
    train: dict = field(default_factory=dict)  # FitOptions fields; chunk_size "full", "auto" or an integer


def _shipped(name: str) -> Path:
    """The package's own recipe `name` (never a user's ./recipes copy): what `pretrain` without a recipe uses."""
    shipped = resources.files("slimtune") / "recipe_files"
    folders = [shipped] if isinstance(shipped, Path) else []
    for folder in [*folders, Path(__file__).resolve().parent.parent / "recipes"]:
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise ConfigError(f"the package's {name} recipe is missing: reinstall slimtune")


def find_recipe(name: str | Path) -> Path:
    """A recipe file by path, or by name (small -> recipes/small.toml) in ./recipes or the package's."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in _search():
        candidate = folder / f"{path.stem}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted({p.stem for f in _search() for p in f.glob("*.toml")})) or "none found"
    raise ConfigError(f"recipe {name!s} not found: give a path to a .toml file or one of: {known}")


def load_recipe(name: str | Path) -> Recipe:
    path = find_recipe(name)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} is not valid TOML ({e}): fix the file") from None
    model, train = raw.get("model"), raw.get("train", {})
    if not isinstance(model, dict):
        raise ConfigError(f"recipe {path} has no [model] table: add one with the model config")
    unknown = set(train) - TRAIN_KEYS
    if unknown:
        raise ConfigError(
            f"recipe {path} has unknown [train] keys {', '.join(sorted(unknown))}: use {', '.join(sorted(TRAIN_KEYS))}"
        )
    try:
        config = PerformerConfig.from_dict(model)
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    extra = set(model) - set(config.to_dict())
    if extra:
        raise ConfigError(f"recipe {path} has unknown [model] keys {', '.join(sorted(extra))}")
    return Recipe(path=path, description=str(raw.get("description", "")), model=config, train=dict(train))


def list_recipes() -> list[Recipe]:
    seen, found = set(), []
    for folder in _search():
        for path in sorted(folder.glob("*.toml")):
            if path.stem not in seen:
                seen.add(path.stem)
                found.append(load_recipe(path))
    return found


def resolve(
    recipe: str | Path | None, model: dict | None = None, train: dict | None = None
) -> tuple[PerformerConfig, dict]:
    """The model config and the training settings of a run: the recipe's values (the small recipe when none is
    given; TRAIN_DEFAULTS for [train] keys it leaves out), then the overrides that are not None. `model` takes
    PerformerConfig fields and `layernorm` ("post"/"pre"); without a given ffn_dim, a changed hidden_dim means
    ffn_dim = 4 x hidden_dim. `train` takes the
    recipe's [train] keys; chunk_size comes back as an integer (L for "full") or None (auto)."""
    base = load_recipe(recipe) if recipe else load_recipe(_shipped(DEFAULT_RECIPE))
    model = {k: v for k, v in (model or {}).items() if v is not None}
    train = {k: v for k, v in (train or {}).items() if v is not None}
    values = base.model.to_dict()
    if "layernorm" in model:
        values["on_gptln"] = LayerNorm.parse(model.pop("layernorm"), "layernorm").on_gptln
    if "ffn_dim" not in model and "hidden_dim" in model:
        values["ffn_dim"] = 4 * model.get("hidden_dim", values["hidden_dim"])
    config = PerformerConfig.from_dict(values | model)
    settings = TRAIN_DEFAULTS | base.train | train
    settings["chunk_size"] = chunk_request(settings["chunk_size"], settings["seq_len"])
    return config, settings
