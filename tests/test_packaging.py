"""Packaging guards: every subpackage ships, the core never imports optional frameworks, examples compile."""

from __future__ import annotations

import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {
        "mp_plugin." + ".".join(p.parent.relative_to(ROOT / "mp_plugin").parts)
        for p in (ROOT / "mp_plugin").rglob("__init__.py")
        if p.parent != ROOT / "mp_plugin"
    }
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["mp_plugin.integrations"] == "integrations"


def test_core_import_does_not_pull_optional_frameworks() -> None:
    code = (
        "import sys, mp_plugin, mp_plugin.plan, mp_plugin.pruning, mp_plugin.certificate, mp_plugin.permute; "
        "bad = [m for m in ('torchao', 'modelopt', 'onnx', 'onnxruntime', 'tensorrt', 'timm', 'transformers', "
        "'matplotlib') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_examples_and_benchmarks_compile() -> None:
    files = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        py_compile.compile(str(f), doraise=True)


def test_cli_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "mp_plugin.cli", "--help"], capture_output=True, text=True, timeout=120)
    for cmd in ("analyze", "prune", "certify", "export", "bench", "demo"):
        assert cmd in out.stdout
