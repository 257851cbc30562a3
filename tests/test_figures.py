"""The figure scripts (benchmarks/figures.py, issue 25) at toy sizes, as CI runs them: every part writes its PNG
and JSON, and the toy runs already show the claims the real ones are for (equal weights, equal adapted bpc)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("figures")
    script = ROOT / "benchmarks" / "figures.py"
    done = subprocess.run([sys.executable, str(script), "all", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", ["tradeoff", "reach", "compat", "onestep"])
def test_each_part_writes_a_png_and_json_with_its_caption(figures, name):
    assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((figures / f"{name}.json").read_text())
    assert "figures.py all --quick" in doc["caption"] and "CPU" in doc["caption"] and doc["seconds"] > 0


def test_the_tradeoff_has_every_method_at_every_length(figures):
    results = json.loads((figures / "tradeoff.json").read_text())["results"]
    methods = {r["method"] for r in results}
    assert methods == {"full backprop", "layer checkpointing", "SLiM C=16", "SLiM C=64"}
    assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in results)
    longest = max(r["seq_len"] for r in results)
    at = {r["method"]: r["peak_bytes"] for r in results if r["seq_len"] == longest}
    assert at["SLiM C=64"] < at["layer checkpointing"] < at["full backprop"]


def test_reach_reports_each_budget_and_method(figures):
    doc = json.loads((figures / "reach.json").read_text())
    assert {(t["budget"], t["method"]) for t in doc["table"]} == {
        (b, m) for b in ("500 MB", "1 GB", "2 GB") for m in ("full", "checkpointing", "slim")
    }
    slim = [r for r in doc["runs"] if r["method"] == "slim"]
    assert [r["seq_len"] for r in slim] == [1024, 4096] and all(r["peak_rss"] > 0 for r in slim)


def test_compat_trains_the_same_weights_at_every_chunk_size(figures):
    doc = json.loads((figures / "compat.json").read_text())
    assert doc["largest_weight_difference"]["full backprop"] == 0
    assert len(doc["largest_weight_difference"]) == 4 and max(doc["largest_weight_difference"].values()) < 1e-4
    assert all(len(curve) == len(doc["curves"]["full backprop"]) for curve in doc["curves"].values())


def test_one_step_fine_tuning_helps_and_is_the_same_at_every_c(figures):
    doc = json.loads((figures / "onestep.json").read_text())
    assert set(doc["results"]) == {"full", "C=16"}
    assert all(r["bpc_after"] < r["bpc_before"] for r in doc["results"].values())
    assert doc["digits"] >= 5 and doc["after_spread"] < 1e-5
