"""The command line's options, made from their one declaration (options.py): `params(...)` turns the fields a
command has into typer parameters, `command(...)` gives a command body those parameters as one namespace, and
`cli_message(error)` shows the Python parameters a library message names as the flags the user typed. No torch.
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import fields
from types import SimpleNamespace
from typing import Annotated

import typer

from . import options as declarations
from .options import flag_for


class Stopped(Exception):
    """Ctrl-C or SIGTERM outside a training run (loading, planning a `plan`, an export): main() reports it."""


def params(group: type, *names: str, exclude: tuple[str, ...] = (), **overrides: dict) -> list[inspect.Parameter]:
    """Typer parameters for `names` of `group` (default: every field of it that has a flag, less `exclude`), in
    that order. `overrides[name]` may change a command's `default`, `help`, `type` or make it an `argument`; the
    flag, the bounds and whether a resume must match it stay those of the declaration. Overrides of fields the
    group does not have are ignored (one override list may serve several groups)."""
    hints = typing.get_type_hints(group, globalns=vars(declarations))
    by_name = {f.name: f for f in fields(group)}
    chosen = names or [f.name for f in fields(group) if f.metadata["flag"].flag and f.name not in exclude]
    found = []
    for name in chosen:
        f, over = by_name[name], overrides.get(name, {})
        spec = f.metadata["flag"]
        hint = over.get("type", spec.cli_type or hints[name])
        help_ = over.get("help", spec.help)
        if over.get("argument"):
            info = typer.Argument(help=help_, show_default=False)
            found.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hint, info]))
            continue
        bounds = {"min": spec.min} if spec.min is not None and _numeric(hint) else {}
        names_ = f"{spec.flag}/{spec.secondary}" if spec.secondary else spec.flag
        info = typer.Option(names_, help=help_, show_default=over.get("show_default", spec.show_default), **bounds)
        default = over.get("default", f.default)
        found.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, info])
        )
    return found


def _numeric(hint) -> bool:
    return hint in (int, float) or any(a in (int, float) for a in typing.get_args(hint))


def command(app: typer.Typer, *groups: list[inspect.Parameter], name: str | None = None):
    """Register `body(args)` as a command whose options are `groups` (lists from `params`); `args` holds every
    option by its Python name."""
    signature = [p for group in groups for p in group]

    def register(body):
        def run(**values):
            try:
                return body(SimpleNamespace(**values))
            except KeyboardInterrupt:  # typer would turn it into a silent exit: main() says it was interrupted
                raise Stopped from None

        run.__signature__ = inspect.Signature(signature)
        run.__annotations__ = {p.name: p.annotation for p in signature}
        run.__name__, run.__doc__ = body.__name__, body.__doc__
        app.command(name=name or body.__name__.strip("_"))(run)
        return body

    return register


def pick(cls, args: SimpleNamespace, **extra):
    """`cls` made from the options in `args` that are its fields, and `extra`."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**(values | extra))


MARKED = re.compile(r"`([a-z_][a-z0-9_]*)((?:=[^`\s]*)?)`")  # `seq_len`, `optimizer=sgd`


def cli_message(error: BaseException | str) -> str:
    """A library error's or warning's message in the command line's words, on one line: each parameter it marks
    (`seq_len`, `optimizer=sgd`) shown as its flag (--seq-len, --optimizer=sgd); nothing else is touched."""
    text = " ".join(str(error).split())
    return MARKED.sub(lambda m: flag_for(m.group(1)) + m.group(2), text)
