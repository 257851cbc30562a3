"""The prepared GPU command (benchmarks/gpu.sh, issue 24) run on CPU at toy sizes, as CI runs it: every part
finishes, the files hold the schema, a part stopped at its time limit does not stop the others; and the parsing
of what a GPU machine prints (nvidia-smi, pytest's junit XML), from samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402

# In nvidia-smi's `--format=csv,noheader,nounits` layout for gpu.NVIDIA_SMI_FIELDS; the first card's memory and
# driver as KINDS.md read them on an H200 here (143771 MiB, 580.159.04), the second as a card without power readings.
NVIDIA_SMI = """\
0, NVIDIA H200, GPU-5b2c4e1a-93f1-7d2e-0c4b-8a9f6e3d2c10, 143771, 1, 580.159.04, P0, 345, 1980, 75.10, 31
1, NVIDIA A100-SXM4-40GB, GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d, 40960, 523, 580.159.04, P8, 210, 1410, [N/A], 29
"""


def _run(out: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--device", "cpu", "--quick",
                           *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "out"
    done = _run(out)
    return out, done


def test_every_part_runs_on_cpu_and_writes_the_schema(quick_run):
    out, done = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert gpu.check(out) == []
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= gpu.MAX_FILES and {"gpu.log", "summary.json", "tests.json", "planner.json"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["quick"] is True
    assert [summary["parts"][p]["status"] for p in gpu.PARTS] == ["ok"] * 4
    assert summary["machine"]["torch"] and "gpus" in summary["machine"]["slimtune_env"]
    assert "tests:" in done.stdout and "planner small" in done.stdout  # the table at the end of the output


def test_the_cuda_tests_ran_on_cpu_and_passed(quick_run):
    tests = json.loads((quick_run[0] / "tests.json").read_text())
    names = {t["name"].split("::")[-1].split("[")[0] for t in tests["tests"] if t["outcome"] == "passed"}
    assert tests["failed"] == tests["errors"] == 0
    assert {"test_fp32_slim_on_the_device_is_the_float64_reference", "test_greedy_generation_on_the_device_is_the_cpus",
            "test_a_resumed_run_on_the_device_is_bit_for_bit_the_uninterrupted_one",
            "test_lora_with_a_bf16_base_on_the_device"} <= names  # fmt: skip
    skipped = [t for t in tests["tests"] if t["outcome"] == "skipped"]
    assert skipped and all("CUDA" in t["message"] for t in skipped)  # the out-of-memory and NVML ones need a card


def test_the_planner_cell_measures_the_chosen_c_and_the_next(quick_run):
    (cell,) = json.loads((quick_run[0] / "planner.json").read_text())["cells"]
    assert cell["chunk_size"] < cell["seq_len"] and cell["within_budget"]
    assert cell["measured_peak_bytes"] <= cell["budget_bytes"] and abs(cell["prediction_error"]) < 0.25
    assert cell["next_chunk_size"] > cell["chunk_size"]
    assert cell["next_measured_peak_bytes"] is not None or "out of memory" in cell["next_note"]


def test_bench_and_profile_hold_their_measurements(quick_run):
    out = quick_run[0]
    runs = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["runs"]}
    assert (
        set(runs) == {"fp32", "bf16", "lora-r8", "lora-r8-bf16", "lora-r8-nf4"} and runs["bf16"]["precision"] == "bf16"
    )
    for run in runs.values():
        assert run["rows"] and all(r["median_s"] and r["peak_bytes"] for r in run["rows"])
    assert runs["lora-r8"]["trainable_parameters"] < runs["fp32"]["trainable_parameters"] / 10
    chunks = json.loads((out / "profile.json").read_text())["chunks"]
    assert [c["chunk_size"] for c in chunks] == [16, 64]
    assert all(c["kernels_per_chunk"] > 10 and c["seconds_per_chunk"] > 0 and c["top"] for c in chunks)


def test_check_names_what_is_missing(quick_run, tmp_path):
    out = quick_run[0]
    for p in out.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    planner = json.loads((tmp_path / "planner.json").read_text())
    del planner["cells"][0]["measured_peak_bytes"]
    (tmp_path / "planner.json").write_text(json.dumps(planner))
    (tmp_path / "profile.json").unlink()
    problems = gpu.check(tmp_path)
    assert "profile.json is missing" in problems
    assert "planner.json: cells[0] has no 'measured_peak_bytes'" in problems and len(problems) == 2


def test_a_part_past_its_limit_is_stopped_and_the_next_still_runs(tmp_path):
    done = _run(tmp_path / "out", "--parts", "tests,profile", "--limit", "tests=2", timeout=300)
    assert done.returncode == 1
    parts = json.loads((tmp_path / "out" / "summary.json").read_text())["parts"]
    assert parts["tests"]["status"] == "stopped at its limit of 2.0 s" and parts["tests"]["seconds"] < 10
    assert parts["profile"]["status"] == "ok" and (tmp_path / "out" / "profile.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "usage: bash benchmarks/gpu.sh OUT"),
        (["OUT", "--parts", "tests,gpus"], "unknown part"),
        (["OUT", "--limit", "bench"], "PART=SECONDS"),
    ],  # fmt: skip
)
def test_bad_arguments_exit_2(tmp_path, args, message):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert done.returncode == 2 and message in done.stderr and not (tmp_path / "OUT").exists()


def test_nvidia_smi_readings_are_parsed_into_numbers():
    h200, a100 = gpu.parse_nvidia_smi(NVIDIA_SMI)
    assert h200["name"] == "NVIDIA H200" and h200["memory.total"] == 143771 and h200["index"] == 0
    assert h200["uuid"].startswith("GPU-5b2c") and h200["driver_version"] == "580.159.04"
    assert h200["power.draw"] == 75.10 and h200["clocks.max.sm"] == 1980 and h200["pstate"] == "P0"
    assert a100["power.draw"] is None and a100["memory.used"] == 523
    with pytest.raises(ValueError, match="fields"):
        gpu.parse_nvidia_smi("0, NVIDIA H200, 143771")


def test_junit_results_are_read_per_test():
    xml = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
    <testcase classname="tests.test_cuda" name="test_a[C7]" time="0.52"/>
    <testcase classname="tests.test_cuda" name="test_b" time="1.50">
      <failure message="assert 0.1 &lt;= 1e-05&#10;second line">trace</failure></testcase>
    <testcase classname="tests.test_cuda" name="test_c" time="0.00"><skipped message="needs CUDA"/></testcase>
    </testsuite></testsuites>"""
    a, b, c = gpu.parse_junit(xml)
    assert a == {"name": "tests.test_cuda::test_a[C7]", "outcome": "passed", "seconds": 0.52, "message": ""}
    assert b["outcome"] == "failed" and b["message"] == "assert 0.1 <= 1e-05" and b["seconds"] == 1.5
    assert c["outcome"] == "skipped" and c["message"] == "needs CUDA"
