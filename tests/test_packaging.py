"""Packaging: every plugin subpackage is listed in pyproject.toml, and the wheel carries plugins and assets
under the cirbench namespace (never a top-level `datasets` package)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"cirbench": REPO / "cirbench", "cirbench.methods": REPO / "methods", "cirbench.datasets": REPO / "datasets"}


def _declared_packages() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def _packages_on_disk() -> set[str]:
    found = set()
    for name, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            if "__pycache__" in rel.parts or "assets" in rel.parts:
                continue
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_every_subpackage_is_declared():
    missing = _packages_on_disk() - _declared_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_wheel_installs_plugins_under_the_cirbench_namespace(tmp_path):
    if importlib.util.find_spec("pip") is None:
        pytest.skip("no pip in this environment (a uv-made venv): the wheel is built with pip")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("cirbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cirbench/methods/basic/__init__.py" in names
    assert not any(n.startswith(("datasets/", "methods/")) for n in names), "top-level datasets/methods leaked"
    data_folders = _declared_packages() - _packages_on_disk()  # folders of data files (no __init__.py)
    for package in _declared_packages() - data_folders:
        assert package.replace(".", "/") + "/__init__.py" in names
    for folder in data_folders:
        assert any(n.startswith(folder.replace(".", "/") + "/") for n in names), f"{folder}'s files are not installed"
    bundled = [n for n in names if n.startswith("cirbench/assets/")]
    if (REPO / "cirbench" / "assets").exists():
        assert bundled, "bundled assets missing from the wheel"


def test_public_namespace_is_lazy_and_complete():
    code = ("import sys, cirbench\n"
            "assert 'torch' not in sys.modules\n"
            "from cirbench import hookimpl, MethodSpec, DatasetSpec, OptionSpec, Query, ImageRef, PaperRow\n"
            "assert 'torch' not in sys.modules, 'specs must not import torch'\n"
            "missing = [n for n in cirbench.__all__ if getattr(cirbench, n, None) is None]\n"
            "assert not missing, missing\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    assert (REPO / "cirbench" / "py.typed").exists()


def test_make_test_torch_defaults_to_the_declared_floor():
    """`make test-torch` checks the oldest torch/torchvision that pyproject.toml admits, so the floor is tested."""
    import re

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {m[1]: m[2] for d in deps if (m := re.fullmatch(r"(torch|torchvision)>=([\d.]+)", d))}
    make = dict(re.findall(r"^(TORCH|TORCHVISION) \?= (\S+)$", (REPO / "Makefile").read_text(), re.M))
    assert floors and all(make[name.upper()].startswith(floor) for name, floor in floors.items()), (floors, make)


def test_the_code_passes_the_type_checker(tmp_path):
    """`make typecheck` (mypy, configured in pyproject.toml: the core, the plugins and the example plugin) in the
    suite: plugin authors type-check against cirbench's types (py.typed), which must hold."""
    pytest.importorskip("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Success" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_the_code_passes_the_linter():
    """`make lint` in the test suite, so that CI holds every change to it: the folders are the Makefile's."""
    import re

    pytest.importorskip("ruff")
    (folders,) = re.findall(r"/ruff check (.+)$", (REPO / "Makefile").read_text(), re.M)
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *folders.split()], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
