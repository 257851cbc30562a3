"""The package as users install it: a wheel (not editable) carries the recipes, and `import slimtune` works
where fcntl and resource do not exist (Windows)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_install_finds_the_recipes(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("slimtune-*.whl"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "import slimtune, slimtune.recipes as r; from pathlib import Path; "
        "print(Path(slimtune.__file__).parent); print(sorted(x.path.stem for x in r.list_recipes()))"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )  # -I: not the source tree
    assert run.returncode == 0, run.stderr
    where, names = run.stdout.splitlines()
    assert Path(where).is_relative_to(target)
    assert names == str(sorted(p.stem for p in (ROOT / "recipes").glob("*.toml")))
    assert (target / "slimtune" / "py.typed").is_file()


def test_import_and_run_folder_lock_without_fcntl_and_resource(tmp_path):
    code = f"""
import sys
import psutil, torch  # third-party packages bring their own Windows code paths; only slimtune's are tested here
sys.modules["fcntl"] = None  # what Windows has: no such modules
sys.modules["resource"] = None
import slimtune, slimtune.cli, slimtune.runs, slimtune.memory
from slimtune.errors import SlimtuneError
from slimtune.runs import RunFolder
assert slimtune.runs.fcntl is None and slimtune.memory.resource is None
assert slimtune.memory.peak_rss() > 0
first, second = RunFolder({str(tmp_path / "run")!r}), RunFolder({str(tmp_path / "run")!r})
first.lock()
try:
    second.lock()
    raise SystemExit("a second lock was granted")
except SlimtuneError as e:
    assert "in use" in str(e)
first.release()
second.lock()
second.release()
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
