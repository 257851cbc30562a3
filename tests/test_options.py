"""The one declaration of every option (slimtune/options.py: name, type, default, bounds) and its one flag
(slimtune/cli_options.py FLAGS), and what is derived from them: each command's typer options, the resume check, the
provenance, the flag a CLI error names; and the rule that the library speaks of Python parameters only (no flag in
any of its strings), the command line of flags."""

import ast
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main

from slimtune import cli_options, options
from slimtune.cli import app
from slimtune.errors import ConfigError

PACKAGE = Path(options.__file__).parent
# Where flags may be named: the command line layer (render.py draws its tables; demo.py is `slimtune demo`, whose
# walkthrough names the commands to try next).
CLI_MODULES = {"cli.py", "cli_options.py", "render.py", "demo.py", "__main__.py"}


def _commands() -> dict:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in group.list_commands(None)}


def test_every_flag_of_every_command_comes_from_one_declaration():
    """Each option of each command is declared once, in options.py, and shown by one flag: the same flag means the
    same option wherever it appears (`--seed` in five commands is one declaration)."""
    flags = [shown.flag for shown in cli_options.FLAGS.values()]
    assert len(flags) == len(set(flags))  # no flag declared twice
    assert set(cli_options.FLAGS) <= set(options.declared())  # a flag for a declared option only
    declared = {shown.flag: name for name, shown in cli_options.FLAGS.items()}
    seen = {}
    for command, cli in _commands().items():
        for param in cli.params:
            if param.param_type_name == "option" and param.opts[0] not in ("--help", "--version"):
                assert declared.get(param.opts[0]) == param.name, f"{command} {param.opts[0]} is not declared"
                seen.setdefault(param.opts[0], set()).add(command)
    assert seen["--seed"] == {"fit", "plan", "pretrain", "eval", "generate", "bench"}
    assert seen["--threads"] >= {"fit", "plan", "eval", "generate", "bench", "pretrain", "demo"}


def test_fit_has_a_flag_for_every_option_a_user_sets():
    """The fit command offers every FitOptions field that has a flag, and FitOptions is the training groups."""
    fit = {p.name for p in _commands()["fit"].params}
    flagged = {f.name for f in fields(options.FitOptions) if f.name in cli_options.FLAGS}
    assert flagged - {"task"} <= fit  # the copy task is pretrain's
    groups = {f.name for g in options.TRAINING_GROUPS for f in fields(g)}
    assert groups == {f.name for f in fields(options.FitOptions)}


def test_plan_takes_every_flag_fit_takes():
    """A fit command pasted into plan is read whole (`--eval-data` was refused): plan predicts that very run."""
    fit = {p.opts[0] for p in _commands()["fit"].params if p.param_type_name == "option"}
    plan = {p.opts[0] for p in _commands()["plan"].params if p.param_type_name == "option"}
    assert fit <= plan and "--eval-data" in plan and "--chunk-size" in plan


def test_resume_and_provenance_follow_the_declaration():
    opts = options.FitOptions(seq_len=77, optimizer="adamw", recovery="store", lr=0.5)
    resume, recorded = opts.resume_settings(), opts.recorded()
    assert resume["seq_len"] == 77 and resume["optimizer"] == "adamw" and resume["recovery"] == "store"
    assert resume["weight_decay"] == 0.01  # adamw's default, as the run uses it
    assert "save_every" not in resume and "device" not in resume and "threads" not in resume  # placement only
    assert recorded["state_recovery"] == "store" and "recovery" not in recorded  # its provenance key
    assert recorded["lr"] == 0.5 and "run_dir" not in recorded


@pytest.mark.parametrize(
    "values, name",
    [
        (dict(seq_len=0), "seq_len"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(clip_grad=0.0), "clip_grad"),
        (dict(steps=True), "steps"),
        (dict(chunk_size="big"), "chunk_size"),
        (dict(threads=0), "threads"),
        (dict(resume=True, restart=True), "resume"),
    ],
)
def test_out_of_range_values_name_their_parameter(values, name):
    with pytest.raises(ConfigError) as caught:
        options.FitOptions(**values).check()
    assert name in caught.value.params and str(caught.value).startswith(f"`{name}`")


def _messages(tree: ast.AST):
    """The string parts of every raised exception's and every warning's message."""
    for node in ast.walk(tree):
        call = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            call = node.exc
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("_warn", "_warn_once", "warn", "Notice"):
                call = node
        if call is None:
            continue
        for arg in call.args:
            for part in ast.walk(arg):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield node.lineno, part.value


def test_no_library_message_names_a_flag():
    """Library errors and warnings name Python parameters; only the CLI maps them to flags."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in CLI_MODULES:
            continue
        for line, text in _messages(ast.parse(path.read_text())):
            if "--" in text:
                found.append(f"{path.name}:{line}: {text!r}")
    assert not found, "\n".join(found)


def test_flag_strings_appear_only_in_the_command_line_layer():
    """No string below the interface (docstrings included) names one of slimtune's flags: the library documents
    its parameters, the command line its flags. (Other tools' flags, such as torchrun's, may be named.)"""
    ours = {shown.flag for shown in cli_options.FLAGS.values()} | {"--help", "--version"}
    ours |= {shown.secondary for shown in cli_options.FLAGS.values() if shown.secondary}
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in CLI_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [f"{path.name}:{node.lineno}: {m}" for m in flag.findall(node.value) if m in ours]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["fit", "--help"]])
def test_help_and_recipes_load_no_torch(args):
    """`python -X importtime` lists every module imported: torch must not be among them."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "slimtune", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "slimtune.cli" in imported  # the listing is real
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_a_bf16_base_computes_in_bf16_and_the_run_records_what_it_computed():
    from slimtune.options import FitOptions

    asked = FitOptions(lora_rank=2, base_dtype="bf16")
    assert str(asked.precision) == "fp32" and str(asked.compute_precision) == "bf16"  # asked, and what runs
    assert asked.recorded()["precision"] == "bf16" and asked.resume_settings()["precision"] == "bf16"
    plain = FitOptions(precision="bf16")
    assert str(plain.compute_precision) == "bf16" and str(FitOptions().compute_precision) == "fp32"
    assert FitOptions().recorded()["precision"] == "fp32"
