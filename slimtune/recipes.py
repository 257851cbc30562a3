"""Recipes: TOML files holding a model config and training settings, such as the SLiM paper's configurations
(recipes/ in the source tree). Each file begins with the command that runs it; command-line flags override
the recipe's values."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .model import PerformerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRAIN_KEYS = {"task", "copy_symbols", "seq_len", "batch_size", "steps", "optimizer", "lr", "chunk_size"}
SEARCH = (Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes")


@dataclass
class Recipe:
    path: Path
    description: str
    model: PerformerConfig
    train: dict = field(default_factory=dict)  # FitOptions fields; chunk_size "full", "auto" or an integer


def find_recipe(name: str | Path) -> Path:
    """A recipe file by path, or by name (small -> recipes/small.toml) in ./recipes or the source tree's."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in SEARCH:
        candidate = folder / f"{path.stem}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted({p.stem for f in SEARCH if f.is_dir() for p in f.glob("*.toml")})) or "none found"
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
        raise ConfigError(f"recipe {path} has unknown [train] keys {', '.join(sorted(unknown))}: use {', '.join(sorted(TRAIN_KEYS))}")
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
    for folder in SEARCH:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            if path.stem not in seen:
                seen.add(path.stem)
                found.append(load_recipe(path))
    return found
