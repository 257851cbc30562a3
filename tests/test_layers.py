"""The package's layers and its one-way import rule (docs/design.md, "Layers"): a module imports modules of its own
layer or of a layer below, never one above, and no import cycle exists. Every import counts, those inside functions
included, and every module must have a layer: a new one is placed here first."""

import ast
from pathlib import Path

import slimtune

PACKAGE = Path(slimtune.__file__).parent

# Lowest first. A layer may import its own and any below it.
LAYERS = {
    # what every layer leans on: errors, sizes, the choices' vocabulary, the library's options, the machine
    "base": {
        "version", "errors", "units", "choices", "options", "config", "atomic", "cgroups", "devices", "memory",
        "threads", "distributed",
    },
    # the math: feature maps, causal linear attention, the network, adapters, the SLiM step, optimizers
    "engine": {"features", "attention", "deferred", "lora", "model", "slim", "optimizers", "quant"},
    # files: checkpoints read and written, the export, data, recipes, the code shipped beside hf exports
    "io": {"checkpoint", "export", "pretrained", "data", "recipes", "hf_remote"},
    # measure -> predict -> choose: the planner, eval's forward plan, the strategies, a run's fixed settings
    "planning": {"breakdown", "planner", "eval_plan", "strategies", "runplan", "inspection"},
    # what a run does: training (fit, pretrain), its run folder, evaluation, generation, the benchmark command
    "run": {"train", "runs", "evaluation", "generation", "bench"},
    # what users touch: the command line, its flags and tables, the demo, the package's API
    "interface": {"cli", "cli_options", "render", "demo", "__init__", "__main__"},
}  # fmt: skip
RANK = {module: rank for rank, members in enumerate(LAYERS.values()) for module in members}


def _module(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else path.stem  # a subpackage counts as one module


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (relative imports, at any depth in the file)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        targets = found.setdefault(module, set())
        inside = path.parent != PACKAGE  # a subpackage's own relative imports stay inside it
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and not (inside and node.level == 1):
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                targets.update(n for n in names if n != module)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slimtune":
                parts = node.module.split(".")
                targets.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                targets.update(a.name.split(".")[1] for a in node.names if a.name.startswith("slimtune."))
    return found


def test_every_module_has_a_layer():
    modules = set(_imports())
    assert modules - set(RANK) == set(), "modules without a layer: place them in LAYERS"
    assert set(RANK) - modules == set(), "LAYERS names modules that do not exist"


def test_no_import_goes_up_a_layer():
    upward = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in sorted(_imports().items())
        for target in sorted(targets)
        if RANK[target] > RANK[module]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target, path + [module]):
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        assert cycle is None, " -> ".join(cycle)


def test_the_check_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The rule's own check on a made-up package: an engine module that imports the command line, and two modules
    that import each other, are both found."""
    (tmp_path / "slim.py").write_text("from .cli import main\n")
    (tmp_path / "cli.py").write_text("def main():\n    from .slim import step\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    graph = _imports()
    assert graph == {"slim": {"cli"}, "cli": {"slim"}}
    assert RANK["cli"] > RANK["slim"]  # slim -> cli goes up
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "cli -> slim -> cli" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def _layer(module: str) -> str:
    return next(name for name, members in LAYERS.items() if module in members)


def _code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of code in a definition: not blank, not a comment, not its docstring."""
    skip = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for number in range(node.lineno, node.end_lineno + 1)
        if number not in skip and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#")
    )


def test_no_function_over_70_lines_and_no_class_over_200():
    """Small pieces, each read at once (docs/design.md): a longer one is split where its steps are."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            limit = 70 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else 200
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if (n := _code_lines(lines, node)) > limit:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n} lines of code")
    assert not long, "\n".join(long)
