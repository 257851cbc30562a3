"""The Python API (issue 14): the README's loop runs as written and equals `slimtune fit`; slim_step on a loaded
model equals full backprop; errors share one base. (from_pretrained / save_pretrained round trips: test_model.py.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, tiny_model

import slimtune
from slimtune.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(path, dtype=torch.float32, **kw):
    model = tiny_model(dtype=torch.float32, **kw)
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, model.config, extra_config={"seq_len": 64})
    return path


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_loop_runs_and_equals_slimtune_fit(tmp_path, data_dir, monkeypatch):
    """README's code, executed as written in a folder with model.safetensors and my.txt; then the same run with
    `slimtune fit` (adam, lr 1e-4, seed 0, C from the plan): the same weights to 1e-6."""
    blocks = _readme_python_blocks()
    assert blocks, "README has no python block under 'Use it from Python'"
    monkeypatch.chdir(tmp_path)
    _checkpoint(tmp_path / "model.safetensors", hidden_dim=32, ffn_dim=64)
    (tmp_path / "my.txt").write_bytes((data_dir / "ptb.test.txt").read_bytes()[:200_000])
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    plan = namespace["plan"]
    assert (tmp_path / "tuned.safetensors").is_file()
    from slimtune.cli import main

    steps = namespace.get("STEPS")
    seq_len = namespace.get("SEQ_LEN")
    assert (
        main(
            [
                "fit",
                "--checkpoint",
                "model.safetensors",
                "--data",
                "my.txt",
                "--out",
                "cli.safetensors",
                "--steps",
                str(steps),
                "--seq-len",
                str(seq_len),
                "--lr",
                "1e-4",
                "--optimizer",
                "adam",
                "--chunk-size",
                str(plan.chunk_size),
                "--seed",
                "0",
            ]
        )
        == 0
    )
    ours, theirs = load_checkpoint("tuned.safetensors"), load_checkpoint("cli.safetensors")
    for name, t in theirs.tensors.items():
        assert_close(ours.tensors[name], t, 1e-6, name)
    base = load_checkpoint("model.safetensors")
    assert any(not torch.equal(base.tensors[n], t) for n, t in ours.tensors.items())  # it did train


def test_the_readme_lora_loop_runs_and_equals_slimtune_fit(tmp_path, data_dir, monkeypatch):
    """README's LoRA loop, executed as written; then `slimtune fit --lora-rank 8` with the same settings: the same
    merged export and the same adapter to 1e-6."""
    from safetensors.torch import load_file

    from slimtune.cli import main

    blocks = _readme_python_blocks()
    assert len(blocks) >= 2, "README has no LoRA block under 'Use it from Python'"
    monkeypatch.chdir(tmp_path)
    _checkpoint(tmp_path / "model.safetensors", hidden_dim=32, ffn_dim=64)
    (tmp_path / "my.txt").write_bytes((data_dir / "ptb.test.txt").read_bytes()[:200_000])
    namespace = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    chunk = str(namespace["plan"].chunk_size)
    args = ["fit", "--checkpoint", "model.safetensors", "--data", "my.txt", "--out", "cli.safetensors", "--steps", "3",
            "--seq-len", "1024", "--lr", "1e-3", "--optimizer", "adam", "--chunk-size", chunk, "--seed", "0",
            "--lora-rank", "8", "--adapter-out", "cli.adapter", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    ours, theirs = load_checkpoint("tuned.safetensors"), load_checkpoint("cli.safetensors")
    base = load_checkpoint("model.safetensors")
    for name, t in theirs.tensors.items():
        assert_close(ours.tensors[name], t, 1e-6, name)
    assert any(not torch.equal(base.tensors[n], t) for n, t in ours.tensors.items())  # the adapters trained
    adapter, cli_adapter = (
        load_file("tuned.adapter/adapter_model.safetensors"),
        load_file("cli.adapter/adapter_model.safetensors"),
    )
    assert adapter.keys() == cli_adapter.keys() and len(adapter) == 2 * 5 * 2  # A and B, 5 maps, 2 layers
    for name, t in cli_adapter.items():
        assert_close(adapter[name], t, 1e-6, name)


def test_slim_step_on_a_loaded_model_equals_full_backprop(tmp_path):
    model = slimtune.PerformerLM.from_pretrained(_checkpoint(tmp_path / "m.safetensors"), dtype=torch.float64)
    windows = torch.randint(0, 256, (2, 101), generator=torch.Generator().manual_seed(0))
    loss = slimtune.slim_step(model, windows, chunk_size=7)
    slim = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(windows[:, :-1])  # plain autograd over the whole sequence
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    full.backward()
    assert abs(loss - full.item()) <= 1e-12 * abs(full.item())
    for name, p in model.named_parameters():
        assert_close(slim[name], p.grad, 1e-10, name)


def test_plan_prints_a_table_and_matches_the_cli(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    plan = slimtune.plan(slimtune.PerformerLM.from_pretrained(src), seq_len=512, mem_budget="2GB", optimizer="sgd")
    text = slimtune.format_plan(plan)
    assert "<- chosen" in text and str(plan.chunk_size) in text
    assert plan.chunk_size == 512
    params = sum(p.numel() for p in slimtune.PerformerLM.from_pretrained(src).parameters())
    # Counted from the model, not from the planner: fp32 gradients are 4 bytes a parameter, and sgd keeps no state.
    assert plan.breakdown.gradients == 4 * params and plan.breakdown.optimizer == 0
    from slimtune.cli import main

    capsys.readouterr()
    assert (
        main(
            [
                "plan",
                "--checkpoint",
                str(src),
                "--seq-len",
                "512",
                "--mem-budget",
                "2GB",
                "--optimizer",
                "sgd",
                "--json",
            ]
        )
        == 0
    )
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["chunk_size"] == plan.chunk_size
    assert [c["chunk_size"] for c in cli["candidates"]] == [c.chunk_size for c in plan.candidates]


def test_errors_are_one_family_with_the_cli_messages(tmp_path):
    with pytest.raises(slimtune.CheckpointError, match="does not exist") as info:
        slimtune.PerformerLM.from_pretrained(tmp_path / "missing.safetensors")
    assert isinstance(info.value, slimtune.SlimtuneError)
    model = slimtune.PerformerLM.from_pretrained(_checkpoint(tmp_path / "m.safetensors"))
    with pytest.raises(slimtune.OutOfBudgetError, match="cannot fit even C = 1"):
        slimtune.plan(model, seq_len=512, mem_budget="1MB")
    with pytest.raises(slimtune.ConfigError, match="`optimizer` must be one of sgd, adam, adamw"):
        slimtune.plan(model, seq_len=512, optimizer="lion")


def test_evaluate_and_generate_take_paths_and_text(tmp_path, data_dir):
    model = slimtune.PerformerLM.from_pretrained(_checkpoint(tmp_path / "m.safetensors"))
    result = slimtune.evaluate(model, data_dir / "ptb.valid.txt", max_bytes=3000)
    assert result.predicted_bytes == 2999 and result.seq_len == 1024  # fit's default L, not the checkpoint's 64
    text = slimtune.generate(model, "Hello", 10, temperature=0)
    assert len(text) == 10


def test_import_slimtune_does_not_import_torch():
    run = subprocess.run(
        [sys.executable, "-c", "import sys, slimtune; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.stdout.strip() == "False", run.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_run(tmp_path, data_dir, script):
    _checkpoint(tmp_path / "model.safetensors", hidden_dim=32, ffn_dim=64)
    (tmp_path / "my.txt").write_bytes((data_dir / "ptb.test.txt").read_bytes()[:100_000])
    run = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "tuned.safetensors").is_file()


def test_fit_without_out_writes_beside_the_checkpoint_as_the_command_line_does(tmp_path, data_dir):
    """slimtune.fit(out=None) and `slimtune fit` without --out: NAME-tuned.safetensors with its run folder, then
    NAME-tuned-2 (nothing overwritten); both runs give the same weights."""
    from slimtune.cli import main

    base = _checkpoint(tmp_path / "model.safetensors")
    data = tmp_path / "my.txt"
    data.write_bytes((data_dir / "ptb.test.txt").read_bytes()[:50_000])
    result = slimtune.fit(base, data, steps=2, seq_len=64, chunk_size=16, device="cpu")
    first = tmp_path / "model-tuned.safetensors"
    assert Path(result.out) == first and first.is_file() and (tmp_path / "model-tuned.safetensors.run").is_dir()
    args = ["fit", "--checkpoint", str(base), "--data", str(data), "--steps", "2", "--seq-len", "64",
            "--chunk-size", "16", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    second = load_checkpoint(tmp_path / "model-tuned-2.safetensors")
    for name, t in load_checkpoint(first).tensors.items():
        assert torch.equal(second.tensors[name], t), name


def test_pretrain_from_a_recipe_name_equals_slimtune_pretrain_recipe(tmp_path):
    """slimtune.pretrain("copy", ...) reads the recipe's model and [train] settings as `slimtune pretrain --recipe
    copy` does; keyword overrides stand above them, as flags do: the same weights bit for bit (on one thread each:
    the last bits depend on the count, which otherwise follows the machine's load)."""
    from slimtune.cli import main

    result = slimtune.pretrain(
        "copy", None, tmp_path / "api.safetensors", steps=2, batch_size=2, device="cpu", threads=1
    )
    assert result.steps == 2 and result.chunk_size == 512  # the recipe's L and chunk_size "full"
    args = ["pretrain", "--recipe", "copy", "--out", str(tmp_path / "cli.safetensors"), "--steps", "2",
            "--batch-size", "2", "--device", "cpu", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    ours, theirs = load_checkpoint(tmp_path / "api.safetensors"), load_checkpoint(tmp_path / "cli.safetensors")
    assert ours.config == theirs.config and ours.config.hidden_dim == 256 and ours.config.n_layers == 1
    for name, t in theirs.tensors.items():
        assert torch.equal(ours.tensors[name], t), name


def test_plan_fit_is_what_slimtune_plan_prints(tmp_path, capsys):
    """slimtune.plan_fit and `slimtune plan --json` on the same checkpoint and flags: the same chunk size and the
    same strategies, each with its C (the largest that fits, judged by each call's own probes)."""
    from slimtune.cli import main

    base = _checkpoint(tmp_path / "model.safetensors", hidden_dim=32, ffn_dim=64)
    ours = slimtune.plan_fit(base, seq_len=512, mem_budget="4GB", device="cpu")
    capsys.readouterr()
    assert main(["plan", "--checkpoint", str(base), "--seq-len", "512", "--mem-budget", "4GB", "--device", "cpu",
                 "--json"]) == 0  # fmt: skip
    theirs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours.plan.chunk_size == theirs["chunk_size"] == 512  # 4 GB: full backprop fits
    assert [(r.name, r.chunk_size) for r in ours.strategies] == [
        (r["name"], r["chunk_size"]) for r in theirs["strategies"]
    ]
    assert ours.run.chunk_source == theirs["run"]["chunk_source"] == "planned"
    with pytest.raises(slimtune.DataError, match="`data` file .*nothere.txt does not exist") as caught:
        slimtune.plan_fit(base, data=[tmp_path / "nothere.txt"], seq_len=512, device="cpu")
    assert "--" not in str(caught.value)


@pytest.mark.parametrize("call", ["fit", "pretrain", "plan_fit"])
def test_a_misspelt_option_is_a_config_error_naming_it(tmp_path, call):
    """Every call that takes FitOptions keywords refuses a name FitOptions lacks with one ConfigError, before any
    work (nothing written)."""
    base = _checkpoint(tmp_path / "model.safetensors")
    args = {
        "fit": (base, tmp_path / "missing.txt", tmp_path / "out.safetensors"),
        "pretrain": ("copy", None, tmp_path / "out.safetensors"),
        "plan_fit": (base,),
    }[call]
    with pytest.raises(slimtune.ConfigError, match="unknown fit option .*seq_lenn.*see slimtune.FitOptions"):
        getattr(slimtune, call)(*args, seq_lenn=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
