"""Checkpoints: reference state dicts convert bit for bit, exports load into an independent reference-layout
module, malicious pickles never run, and every validation failure is one line, exit 2, nothing written."""

import json
import math
import os

import pytest
import torch
from helpers import safetensors_layout, tiny_model
from safetensors.torch import save_file
from torch import nn

from slimtune.checkpoint import load_checkpoint, save_checkpoint
from slimtune.cli import main


class ReferenceLayout(nn.Module):
    """The SLiM reference code's parameter layout, written here from CONTRACT.md only."""

    def __init__(self, vocab, d, layers, ffn):
        super().__init__()
        self.input_map = nn.Embedding(vocab, d // 2)
        self.output_logit_map = nn.Linear(d, vocab)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.attention = nn.Module()
            for name in ("q_map", "k_map", "v_map"):
                setattr(layer.attention, name, nn.Linear(d, d))
            layer.U_map, layer.V_map = nn.Linear(d, ffn), nn.Linear(ffn, d)
            layer.layernorm1, layer.layernorm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.layers.append(layer)


@pytest.fixture
def state_dict():
    return {k: v.contiguous() for k, v in tiny_model("sqr", True, dtype=torch.float32, seed=2).state_dict().items()}


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reference_state_dict_converts_bit_identical(capsys, tmp_path, state_dict):
    src, dst = tmp_path / "ref.pt", tmp_path / "model.safetensors"
    torch.save(state_dict, src)
    code, _, err = cli(
        capsys, "convert", src, "--out", dst, "--n-heads", 2, "--feature-type", "sqr", "--layernorm", "post"
    )
    assert code == 0, err
    converted = load_checkpoint(dst)
    assert converted.tensors.keys() == state_dict.keys()
    for name, t in state_dict.items():
        assert torch.equal(converted.tensors[name], t) and converted.tensors[name].dtype == t.dtype
    code, out, _ = cli(capsys, "inspect", dst, "--json")
    info = json.loads(out.strip().splitlines()[-1])
    assert info["parameters"] == sum(t.numel() for t in state_dict.values())
    assert info["config"] == {
        "vocab_size": 256,
        "hidden_dim": 16,
        "n_layers": 2,
        "ffn_dim": 32,
        "n_heads": 2,
        "feature_type": "sqr",
        "on_gptln": True,
    }


def test_missing_settings_name_the_flag(capsys, tmp_path, state_dict):
    src = tmp_path / "ref.pt"
    torch.save(state_dict, src)
    code, _, err = cli(capsys, "convert", src, "--out", tmp_path / "o.safetensors", "--n-heads", 2)
    assert code == 2 and "--feature-type" in err and "--layernorm" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_refuses_an_existing_out_unless_overwrite(capsys, tmp_path, state_dict):
    """An existing --out is kept, byte for byte, unless --overwrite is given; then it holds the converted weights."""
    src, dst = tmp_path / "ref.pt", tmp_path / "model.safetensors"
    torch.save(state_dict, src)
    dst.write_bytes(b"a finished fine-tune")
    flags = ["--n-heads", 2, "--feature-type", "sqr", "--layernorm", "post"]
    code, _, err = cli(capsys, "convert", src, "--out", dst, *flags)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert dst.read_bytes() == b"a finished fine-tune"
    code, _, err = cli(capsys, "convert", src, "--out", dst, *flags, "--overwrite")
    assert code == 0, err
    assert all(torch.equal(load_checkpoint(dst).tensors[n], t) for n, t in state_dict.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fine_tuned_export_loads_strict_into_reference_layout(capsys, tmp_path, state_dict, data_dir, dtype):
    base, out = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    tensors = {k: v.to(dtype) for k, v in state_dict.items()}
    save_checkpoint(base, tensors, tiny_model().config)
    code, _, err = cli(
        capsys,
        "fit",
        "--checkpoint",
        base,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        out,
        "--steps",
        2,
        "--seq-len",
        64,
        "--chunk-size",
        16,
    )
    assert code == 0, err
    tuned = load_checkpoint(out)
    assert tuned.config == load_checkpoint(base).config
    ref = ReferenceLayout(256, 16, 2, 32).to(dtype)
    ref.load_state_dict(tuned.tensors, strict=True)
    for name, t in tuned.tensors.items():
        assert t.dtype == dtype and t.shape == tensors[name].shape
    assert any(not torch.equal(tuned.tensors[n], tensors[n]) for n in tensors), "fit changed nothing"


def test_round_trip_is_identical(tmp_path, state_dict):
    cfg = tiny_model().config
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(a, state_dict, cfg, extra_config={"seq_len": 512})
    first = load_checkpoint(a)
    save_checkpoint(b, first.tensors, first.config, extra_config=first.extra_config)
    second = load_checkpoint(b)
    assert second.config == cfg and second.extra_config == {"seq_len": 512}
    for name in state_dict:
        assert torch.equal(second.tensors[name], state_dict[name])


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(capsys, tmp_path, state_dict):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    src = tmp_path / "evil.pt"
    torch.save({**state_dict, "payload": Exploit()}, src)
    code, _, err = cli(capsys, "inspect", src, "--n-heads", 2, "--feature-type", "sqr", "--layernorm", "post")
    assert code == 2 and "refusing" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def corrupt_cases(tmp_path, state_dict):
    cfg = tiny_model().config
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, state_dict, cfg)
    data = good.read_bytes()
    cases = {}

    def write(name, payload):
        path = tmp_path / name
        path.write_bytes(payload)
        cases[name] = path

    write("truncated.safetensors", data[: len(data) // 2])
    write("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    write("empty.safetensors", b"")
    meta = {"format": "pt", "slimtune_config": "{not json"}
    save_file(state_dict, str(tmp_path / "badjson.safetensors"), metadata=meta)
    cases["badjson.safetensors"] = tmp_path / "badjson.safetensors"
    bad_heads = json.dumps(cfg.to_dict() | {"n_heads": 3})
    save_file(state_dict, str(tmp_path / "heads.safetensors"), metadata={"format": "pt", "slimtune_config": bad_heads})
    cases["heads.safetensors"] = tmp_path / "heads.safetensors"
    bad_ft = json.dumps(cfg.to_dict() | {"feature_type": "gauss"})
    save_file(state_dict, str(tmp_path / "ft.safetensors"), metadata={"format": "pt", "slimtune_config": bad_ft})
    cases["ft.safetensors"] = tmp_path / "ft.safetensors"
    missing = {k: v for k, v in state_dict.items() if k != "layers.1.U_map.bias"}
    save_checkpoint(tmp_path / "missing.safetensors", missing, cfg)
    cases["missing.safetensors"] = tmp_path / "missing.safetensors"
    extra = {**state_dict, "layers.0.attention.o_map.weight": torch.zeros(2)}
    save_checkpoint(tmp_path / "extra.safetensors", extra, cfg)
    cases["extra.safetensors"] = tmp_path / "extra.safetensors"
    shape = {**state_dict, "layers.0.U_map.weight": torch.zeros(33, 16)}
    save_checkpoint(tmp_path / "shape.safetensors", shape, cfg)
    cases["shape.safetensors"] = tmp_path / "shape.safetensors"
    nan = {**state_dict, "output_logit_map.bias": torch.full((256,), math.nan)}
    save_checkpoint(tmp_path / "nan.safetensors", nan, cfg)
    cases["nan.safetensors"] = tmp_path / "nan.safetensors"
    cases["folder"] = tmp_path
    return cases


EXPECT = {
    "truncated.safetensors": "truncated",
    "garbage.safetensors": "is not a readable checkpoint",
    "empty.safetensors": "empty",
    "badjson.safetensors": "invalid slimtune_config JSON",
    "heads.safetensors": "not divisible by n_heads 3",
    "ft.safetensors": "unknown feature type 'gauss'",
    "missing.safetensors": "missing layers.1.U_map.bias",
    "extra.safetensors": "unexpected layers.0.attention.o_map.weight",
    "shape.safetensors": "layers.0.U_map.weight expected [32, 16] found [33, 16]",
    "nan.safetensors": "non-finite values (NaN or inf) in output_logit_map.bias",
    "folder": "is a folder without model.safetensors",
}


@pytest.mark.parametrize("case", EXPECT)
def test_validation_failures(capsys, tmp_path, state_dict, data_dir, case):
    path = corrupt_cases(tmp_path, state_dict)[case]
    for args in (
        ["inspect", path],
        ["convert", path, "--out", tmp_path / "out.safetensors"],
        ["fit", "--checkpoint", path, "--data", data_dir / "ptb.test.txt", "--out", tmp_path / "out.safetensors"],
        # a bf16 base is read by slimtune's own streaming reader, not safetensors' mapping: the same messages
        ["fit", "--checkpoint", path, "--data", data_dir / "ptb.test.txt", "--out", tmp_path / "out.safetensors",
         "--lora-rank", 2, "--base-dtype", "bf16"],
        # quantized as it is read: the same messages (a non-finite weight shows in its scales)
        ["fit", "--checkpoint", path, "--data", data_dir / "ptb.test.txt", "--out", tmp_path / "out.safetensors",
         "--lora-rank", 2, "--base-dtype", "nf4"],
    ):  # fmt: skip
        code, _, err = cli(capsys, *args)
        assert code == 2, (args, err)
        assert EXPECT[case] in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_read_quantized_is_refused_by_name(capsys, tmp_path, state_dict, data_dir, fmt, bad):
    """A layer map's weight with one NaN or inf, quantized as it is read: refused as the unquantized read refuses it
    (its block's or row's scale is not finite), naming the tensor."""
    broken = dict(state_dict)
    broken["layers.1.U_map.weight"] = broken["layers.1.U_map.weight"].clone()
    broken["layers.1.U_map.weight"][3, 5] = bad
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, broken, tiny_model().config)
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "fit", "--checkpoint", path, "--data", data_dir / "ptb.test.txt", "--out", out,
                       "--lora-rank", 2, "--base-dtype", fmt)  # fmt: skip
    assert code == 2 and "non-finite values (NaN or inf) in layers.1.U_map.weight" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_hf_folder_and_dtype(capsys, tmp_path, state_dict, data_dir):
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, state_dict, tiny_model().config)
    folder = tmp_path / "new" / "deeper" / "tuned-hf"
    code, _, err = cli(
        capsys,
        "fit",
        "--checkpoint",
        base,
        "--data",
        data_dir / "ptb.test.txt",
        "--out",
        folder,
        "--format",
        "hf",
        "--dtype",
        "bf16",
        "--steps",
        1,
        "--seq-len",
        32,
        "--chunk-size",
        8,
    )
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "configuration_slim_performer.py",
        "model.safetensors",
        "modeling_slim_performer.py",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_dim"] == 16 and config["model_type"] == "slim_performer"
    loaded = load_checkpoint(folder)
    assert all(t.dtype == torch.bfloat16 for t in loaded.tensors.values())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_bad_output_paths(capsys, tmp_path, state_dict, data_dir):
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, state_dict, tiny_model().config)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out, message in ((tmp_path, "is a directory"), (blocker / "sub.safetensors", "cannot write under")):
        code, _, err = cli(
            capsys, "fit", "--checkpoint", base, "--data", data_dir / "ptb.test.txt", "--out", out, "--seq-len", 32
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli(capsys, "convert", base, "--out", tmp_path / "x.safetensors", "--dtype", "fp8")
    assert code == 2 and "--dtype" in err and not (tmp_path / "x.safetensors").exists()


def test_output_folder_not_created_on_bad_input(capsys, tmp_path, state_dict):
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, state_dict, tiny_model().config)
    out = tmp_path / "missing" / "tuned.safetensors"
    code, _, _ = cli(capsys, "fit", "--checkpoint", base, "--data", tmp_path / "nope.txt", "--out", out)
    assert code == 2 and not out.parent.exists()


def test_inspect_reports_the_measured_cost_of_fine_tuning(capsys, tmp_path, state_dict):
    """Weights and gradients in fp32 (8 bytes a parameter) plus the optimizer's state: none for sgd, two moments
    for adam and adamw (8 more), counted here from the tensor shapes."""
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, state_dict, tiny_model().config)
    code = main(["inspect", str(base), "--json"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = sum(t.numel() for t in state_dict.values())
    # adafactor: a row and a column vector per matrix, a full vector per bias or gain (fp32)
    factored = sum(4 * (t.shape[0] + t.shape[1]) if t.dim() == 2 else 4 * t.numel() for t in state_dict.values())
    assert code == 0 and info["parameters"] == n
    assert info["fine_tuning_bytes"] == {"sgd": 8 * n, "adam": 16 * n, "adamw": 16 * n, "adafactor": 8 * n + factored}
    # LoRA r8 with adam on each base: the layers' map weights in 4, 2, 1 (and an fp32 scale a row) or 0.5 bytes
    # (and an fp32 scale a block of 64), their biases in the base's dtype for bf16, fp32 otherwise; the adapters
    # (r8 on q, k, v, U, V) in fp32 with a gradient and two moments: 16 bytes a value.
    maps = {k: t for k, t in state_dict.items() if k.startswith("layers.") and k.split(".")[-2].endswith("_map")}
    weights = {k: t for k, t in maps.items() if k.endswith(".weight")}
    rest = 4 * sum(t.numel() for k, t in state_dict.items() if k not in maps)
    biases = sum(t.numel() for k, t in maps.items() if k not in weights)
    adapters = 16 * sum(8 * (t.shape[0] + t.shape[1]) for t in weights.values())
    held = {
        "fp32": 4 * sum(t.numel() for t in maps.values()),
        "bf16": 2 * sum(t.numel() for t in maps.values()),
        "int8": sum(t.numel() + 4 * t.shape[0] for t in weights.values()) + 4 * biases,
        "nf4": sum(math.ceil(t.numel() / 2) + 4 * math.ceil(t.numel() / 64) for t in weights.values()) + 4 * biases,
    }
    assert info["lora_bytes"] == {base: rest + bytes_ + adapters for base, bytes_ in held.items()}


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_reading_into_other_dtypes_converts_each_tensor_and_remembers_the_files(tmp_path, state_dict, stored):
    """load_checkpoint(dtype=...) reads tensor by tensor (plain reads, no mapping): each value equals safetensors'
    own read of the file converted with torch; the checkpoint reports and exports the file's dtypes."""
    from safetensors.torch import load_file

    from slimtune.lora import read_dtypes
    from slimtune.pretrained import PerformerLM

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {k: v.to(stored) for k, v in state_dict.items()}, tiny_model(seed=2).config)
    truth = load_file(str(path))
    for dtype in (torch.bfloat16, read_dtypes(torch.bfloat16), torch.float64):
        checkpoint = load_checkpoint(path, dtype=dtype)
        for name, t in truth.items():
            want = dtype(name) if callable(dtype) and not isinstance(dtype, torch.dtype) else dtype
            assert checkpoint.tensors[name].dtype == want and torch.equal(checkpoint.tensors[name], t.to(want)), name
        assert checkpoint.dtypes == [str(stored).removeprefix("torch.")]
        checkpoint.release()
        assert {t.dtype for t in checkpoint.tensors.values()} == {stored}
    model = PerformerLM.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert all(again[n].dtype == stored for n in truth)  # the export keeps the input's dtypes


def test_the_tensor_by_tensor_writer_lays_out_the_file_as_safetensors_does(tmp_path):
    """checkpoint.save_file against safetensors.torch.save_file on every dtype a checkpoint may hold, names that
    sort differently by dtype and by name, an empty tensor, a scalar, and non-ASCII text: the same header length,
    tensor entries in the same order, the same data bytes, the same metadata (whose key order save_file takes from
    a hash map), and load_file reads back the same tensors. The tensors are made only when written, one at a time."""
    from safetensors.torch import load_file

    from slimtune.checkpoint import SAFETENSORS_DTYPES, LazyTensors
    from slimtune.checkpoint import save_file as write

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}.{code.lower()}": (torch.randn(3, i + 1, generator=g) * 50).to(dtype)
        for i, (code, dtype) in enumerate(SAFETENSORS_DTYPES.items())
    }
    tensors |= {"a.empty": torch.zeros(0, 4), "z.scalar": torch.tensor(2.5, dtype=torch.float64), "é": torch.ones(2)}
    metadata = {"format": "pt", "note": json.dumps({"text": 'café\n"quoted"'}), "zz": "", "aa": "x"}
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    made = []

    def make(name):
        assert name not in made  # each one once
        made.append(name)
        return tensors[name].clone()  # a tensor of its own, dropped once written

    lazy = LazyTensors({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, make)
    write(lazy, tmp_path / "ours.safetensors", metadata)
    assert sorted(made) == sorted(tensors)
    assert safetensors_layout(tmp_path / "ours.safetensors") == safetensors_layout(tmp_path / "theirs.safetensors")
    ours, theirs = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    assert ours.keys() == theirs.keys() == tensors.keys()
    assert all(ours[n].dtype == t.dtype and torch.equal(ours[n], t) for n, t in theirs.items())


@pytest.mark.parametrize("kind", ["safetensors", "pt", "pt-legacy"])
def test_read_tensor_reads_one_tensor_as_stored(tmp_path, state_dict, kind):
    """What an export reads again, one tensor at a time, against the state dict the file was written from."""
    from slimtune.checkpoint import read_tensor

    tensors = {k: v.to(torch.bfloat16) if "U_map" in k else v for k, v in state_dict.items()}
    if kind == "safetensors":
        path = tmp_path / "m.safetensors"
        save_checkpoint(path, tensors, tiny_model(seed=2).config)
    else:
        path = tmp_path / "m.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=kind == "pt")
    checkpoint = load_checkpoint(path, n_heads=2, feature_type="sqr", layernorm="post")
    checkpoint.release()  # as after loading a model: names, shapes and dtypes only
    for name, t in tensors.items():
        read = read_tensor(checkpoint, name)
        assert read.dtype == t.dtype and torch.equal(read, t), name
