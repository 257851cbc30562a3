"""What a CUDA card must show (issue 24): SLiM's exactness on the card, generation, a real out-of-memory fallback,
NVML finding the card by UUID, resume and LoRA with a bf16 base. Marked `cuda`: `pytest -m cuda` on a GPU machine,
or `bash benchmarks/gpu.sh OUT` there, which runs them first.

Without CUDA they are skipped, except under SLIMTUNE_CUDA_TESTS=cpu (what `benchmarks/gpu.sh OUT --device cpu`
sets, and CI runs): then the device-independent ones run on the CPU, so that they cannot reach a card broken.
The two that need a card itself (the allocator cap, NVML) stay skipped there."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import reference
import torch
from helpers import projections, rel_err, save_model, tiny_model

from slimtune import lora
from slimtune.cli import main
from slimtune.generation import generate
from slimtune.slim import slim_step

pytestmark = pytest.mark.cuda
L = 96
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("SLIMTUNE_CUDA_TESTS") == "cpu":
        return torch.device("cpu")
    pytest.skip("needs CUDA (SLIMTUNE_CUDA_TESTS=cpu runs the device-independent ones on the CPU)")


@pytest.fixture
def card(device) -> torch.device:
    if device.type != "cuda":
        pytest.skip("needs a CUDA card itself")
    return device


def windows(B=2, seed=0):
    return torch.randint(0, 256, (B, L + 1), generator=torch.Generator().manual_seed(seed))


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().cpu().flatten() for _, p in sorted(model.named_parameters())])


def reference_grads(model) -> torch.Tensor:
    state = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    draws = projections(model)  # on the device: the reference computes on the CPU
    draws = None if draws is None else [w.cpu() for w in draws]
    _, grads = reference.loss_and_grads(state, model.config.to_dict(), windows(), None, draws)
    return torch.cat([grads[name].flatten() for name, _ in sorted(model.named_parameters())])


def text_file(tmp_path, n=6000):
    """A made-up corpus (the GPU machine has no ../shared/data): a few words in a seeded order."""
    words = ["the", "chunk", "state", "of", "a", "performer", "sums", "keys", "and", "values", "\n"]
    order = torch.randint(0, len(words), (n // 5,), generator=torch.Generator().manual_seed(5)).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in order))
    return path


@pytest.mark.parametrize("C", [7, 32, L], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("feature", ["sqr", "favor+"])
def test_fp32_slim_on_the_device_is_the_float64_reference(device, feature, C):
    model = tiny_model(feature, True, dtype=torch.float32, hidden_dim=32, ffn_dim=64).to(device)
    slim_step(model, windows().to(device), C)
    err = rel_err(flat_grads(model), reference_grads(model))
    assert err <= 1e-5, f"relative error {err:.2e} against the float64 reference"


def test_bf16_slim_on_the_device_is_as_close_as_bf16_full_backprop(device):
    model = tiny_model("elu+1", True, dtype=torch.float32, hidden_dim=32, ffn_dim=64).to(device)
    expected = reference_grads(model)

    def error(C):
        model.zero_grad(set_to_none=True)
        slim_step(model, windows().to(device), C, precision="bf16")
        return rel_err(flat_grads(model), expected)

    full, slim = error(L), error(16)
    assert full < 3e-2 and slim <= 1.5 * full + 5e-3, (slim, full)


def test_greedy_generation_on_the_device_is_the_cpus(device):
    """float64 on both: the same bytes, and no argmax decided by rounding."""
    model = tiny_model("sqr", True, dtype=torch.float64, hidden_dim=32, ffn_dim=64)
    on_cpu = generate(model, b"the state ", 40, temperature=0.0, chunk_size=8)
    on_device = generate(copy.deepcopy(model).to(device), b"the state ", 40, temperature=0.0, chunk_size=8)
    assert on_device == on_cpu and len(on_device) == 40


def _fit(tmp_path, device, *args, out="tuned.safetensors", capsys=None):
    base = tmp_path / "base.safetensors"
    if not base.exists():
        save_model(base, tiny_model("sqr", True, dtype=torch.float32, hidden_dim=32, ffn_dim=64))
    code = main(["fit", "--checkpoint", str(base), "--data", str(text_file(tmp_path)), "--seq-len", "128",
                 "--chunk-size", "32", "--lr", "0.01", "--schedule", "constant", "--out", str(tmp_path / out),
                 "--device", str(device.type), "--json", *map(str, args)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_a_resumed_run_on_the_device_is_bit_for_bit_the_uninterrupted_one(device, tmp_path, capsys):
    from safetensors.torch import load_file

    _fit(tmp_path, device, "--steps", 4, out="straight.safetensors", capsys=capsys)
    _fit(tmp_path, device, "--steps", 2, out="resumed.safetensors", capsys=capsys)
    _fit(tmp_path, device, "--steps", 4, "--resume", out="resumed.safetensors", capsys=capsys)
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"resume differs in {different[:3]}"


def test_lora_with_a_bf16_base_on_the_device(device, tmp_path, capsys):
    """The adapters' gradients under a bf16 base at C = 16 are as close to float64 as bf16 full backprop's; fit
    trains and exports such a model on the device."""
    model = tiny_model("sqr", True, dtype=torch.float32, hidden_dim=32, ffn_dim=64)
    lora.add(model, rank=4)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    exact = copy.deepcopy(model).double()
    slim_step(exact, windows(), L)
    lora.freeze_base_to(model, torch.bfloat16)
    model = model.to(device)

    def errors(C):
        model.zero_grad(set_to_none=True)
        slim_step(model, windows().to(device), C, precision="bf16")
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        return {n: rel_err(g, exact.get_parameter(n).grad) for n, g in grads.items()}

    full, slim = errors(L), errors(16)
    assert len(full) == 2 * 5 * 2 and max(full.values()) < 0.1
    for name, err in slim.items():
        assert err <= 2 * full[name] + 1e-3, f"{name}: SLiM {err:.2e}, full backprop {full[name]:.2e}"
    result = _fit(tmp_path, device, "--steps", 2, "--lora-rank", 4, "--base-dtype", "bf16", capsys=capsys)
    assert result["trainable_parameters"] == 2 * 4 * (3 * (32 + 32) + 2 * (32 + 64))  # 2 layers, 5 maps each
    assert result["device"].startswith(device.type) and all(map(math.isfinite, result["losses"]))


def _python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})  # fmt: skip


def test_a_real_cuda_out_of_memory_falls_back_to_a_smaller_chunk(card, tmp_path):
    """The allocator capped at 300 MB (torch.cuda.set_per_process_memory_fraction, in a process of its own):
    full backprop of L = 16384 at d 256 needs more, so `--chunk-size 16384` runs out of memory on the card, and the
    step is retried at smaller C until one fits."""
    base = save_model(tmp_path / "base.safetensors", tiny_model("sqr", True, dtype=torch.float32, hidden_dim=256,
                                                                ffn_dim=1024, n_heads=4))  # fmt: skip
    data = text_file(tmp_path, n=40_000)
    args = ["fit", "--checkpoint", str(base), "--data", str(data), "--seq-len", "16384", "--chunk-size", "16384",
            "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "t.safetensors"), "--json"]  # fmt: skip
    code = f"""
import sys, torch
torch.cuda.set_per_process_memory_fraction(300e6 / torch.cuda.get_device_properties(0).total_memory, 0)
from slimtune.cli import main
sys.exit(main({args!r}))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "out of memory at chunk size 16384" in done.stderr
    assert result["chunk_size"] < 16384 and result["steps"] == 1


@pytest.mark.parametrize("visible", ["index", "uuid"])
def test_nvml_finds_the_card_by_uuid_whatever_cuda_visible_devices_says(card, visible):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"NVML not usable here: {e}")
    last = pynvml.nvmlDeviceGetCount() - 1
    handle = pynvml.nvmlDeviceGetHandleByIndex(last)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    done = _python(
        "import sys; from slimtune.cli import main; sys.exit(main(['env', '--json']))",
        env={"CUDA_VISIBLE_DEVICES": str(last) if visible == "index" else uuid},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    gpus = json.loads(done.stdout.strip().splitlines()[-1])["gpus"]
    assert len(gpus) == 1 and gpus[0]["index"] == 0
    assert gpus[0]["uuid"] == uuid.lower().removeprefix("gpu-") and gpus[0]["total_bytes"] == total
