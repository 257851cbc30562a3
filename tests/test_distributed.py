"""Issue 8: `slimtune fit` and `pretrain` under torchrun (two CPU processes, gloo) against one process."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, rel_err, save_model, tiny_model

from slimtune.checkpoint import load_checkpoint
from slimtune.cli import main
from slimtune.pretrained import PerformerConfig, PerformerLM

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

L, B = 64, 2  # per rank; one process gets 2 x B windows


def torchrun(cwd, *args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "slimtune",
        *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = tiny_model("favor+", True, dtype=torch.float32, seed=3)
    path = tmp_path_factory.mktemp("ddp") / "base.safetensors"
    save_model(path, model)
    return path


@pytest.mark.parametrize("chunk", [8, L], ids=["slim-C8", "full-backprop"])
def test_two_ranks_take_the_step_of_one_process_on_the_combined_batch(tmp_path, base, data_dir, chunk, capsys):
    common = [
        "--data",
        data_dir / "ptb.test.txt",
        "--seq-len",
        L,
        "--chunk-size",
        chunk,
        "--steps",
        1,
        "--optimizer",
        "sgd",
        "--lr",
        0.5,
        "--device",
        "cpu",
    ]
    two = tmp_path / "two.safetensors"
    torchrun(tmp_path, "fit", "--checkpoint", base, "--out", two, "--batch-size", B, *common)
    one = tmp_path / "one.safetensors"
    assert (
        main(["fit", "--checkpoint", str(base), "--out", str(one), "--batch-size", str(2 * B), *map(str, common)]) == 0
    )
    capsys.readouterr()
    start, a, b = (load_checkpoint(p).tensors for p in (base, one, two))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # the step did something
    for name in a:
        assert_close(b[name] - start[name], a[name] - start[name], 1e-5, name)  # the same update
    # Only rank 0 wrote: one metrics line for one step, one state, one export (an ordinary contract checkpoint).
    run = tmp_path / "two.safetensors.run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads(load_checkpoint(two).metadata["slimtune_provenance"])["world_size"] == 2
    assert load_checkpoint(two).config == load_checkpoint(base).config
    # Resume needs the same number of ranks: a single process may not continue a two-rank run.
    code = main(
        ["fit", "--checkpoint", str(base), "--out", str(two), "--batch-size", str(B), "--resume", *map(str, common)]
    )
    assert code == 2 and "world_size 2 (now 1)" in capsys.readouterr().err


def test_pretrain_under_torchrun(tmp_path, data_dir, capsys):
    """Two ranks of B windows take the steps one process takes on 2 x B windows (the same seed gives the same
    initialisation and global batches), and rank 0 exports the recipe's model config."""
    common = [
        "--recipe",
        "small",
        "--data",
        data_dir / "ptb.test.txt",
        "--seq-len",
        32,
        "--steps",
        2,
        "--chunk-size",
        8,
        "--optimizer",
        "sgd",
        "--lr",
        0.5,
        "--device",
        "cpu",
    ]
    two = tmp_path / "two.safetensors"
    torchrun(tmp_path, "pretrain", "--out", two, "--batch-size", B, *common)
    one = tmp_path / "one.safetensors"
    assert main(["pretrain", "--out", str(one), "--batch-size", str(2 * B), *map(str, common)]) == 0
    capsys.readouterr()
    ckpt_one, ckpt_two = load_checkpoint(one), load_checkpoint(two)
    # recipes/small.toml's [model], written out: the training flags leave it as it is.
    small = PerformerConfig(
        vocab_size=256, hidden_dim=128, n_layers=2, ffn_dim=512, n_heads=2, feature_type="sqr", on_gptln=True
    )
    assert ckpt_two.config == small and ckpt_two.extra_config == {"seq_len": 32}
    provenance = json.loads(ckpt_two.metadata["slimtune_provenance"])
    assert (provenance["world_size"], provenance["steps"], provenance["chunk_size"]) == (2, 2, 8)
    # Both runs start from the seed-0 initialisation; plain SGD keeps the updates linear in the gradients, so the
    # two-rank update equals the single-process one up to the rounding of the all-reduce.
    torch.manual_seed(0)
    init = PerformerLM(small).state_dict()
    a, b = ckpt_one.tensors, ckpt_two.tensors
    assert a.keys() == b.keys() == init.keys()
    assert all(rel_err(a[name], init[name]) > 1e-4 for name in a)  # the steps moved every tensor
    for name in a:
        assert_close(b[name] - init[name], a[name] - init[name], 1e-5, name)


def test_two_ranks_train_lora_adapters_as_one_process_does(tmp_path, base, data_dir, capsys):
    """LoRA under torchrun: the ranks all-reduce the adapters' gradients only (the base has none), and the merged
    export and the adapter equal one process's on the combined batch."""
    from safetensors.torch import load_file

    common = ["--data", data_dir / "ptb.test.txt", "--seq-len", L, "--chunk-size", 8, "--steps", 1,
              "--optimizer", "sgd", "--lr", 0.5, "--device", "cpu", "--lora-rank", 2, "--lora-alpha", 8]  # fmt: skip
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    torchrun(tmp_path, "fit", "--checkpoint", base, "--out", two, "--batch-size", B, "--adapter-out",
             tmp_path / "two.adapter", *common)  # fmt: skip
    args = ["fit", "--checkpoint", base, "--out", one, "--batch-size", 2 * B, "--adapter-out", tmp_path / "one.adapter"]
    assert main([str(a) for a in args + common]) == 0
    capsys.readouterr()
    start, a, b = (load_checkpoint(p).tensors for p in (base, one, two))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # the adapters moved the merged weights
    for name in a:
        assert_close(b[name] - start[name], a[name] - start[name], 1e-5, name)
    adapter_one, adapter_two = (load_file(str(tmp_path / f"{n}.adapter" / "adapter_model.safetensors"))
                                for n in ("one", "two"))  # fmt: skip
    assert adapter_one.keys() == adapter_two.keys()
    for name, t in adapter_one.items():
        assert_close(adapter_two[name], t, 1e-5, name)
