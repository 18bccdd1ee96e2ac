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


OPTIONAL_FRAMEWORKS = (
    "torchao",
    "modelopt",
    "onnx",
    "onnxruntime",
    "tensorrt",
    "timm",
    "transformers",
    "accelerate",
    "matplotlib",
)

_EVERY_CORE_MODULE = """
import importlib, pkgutil, sys
import mp_plugin
optional = set(sys.argv[1].split(","))
names = sorted(m.name for m in pkgutil.walk_packages(mp_plugin.__path__, "mp_plugin."))
assert len(names) > 40, names
bad = {}
for name in names:
    seen = {k.split(".")[0] for k in sys.modules} & optional
    importlib.import_module(name)
    new = ({k.split(".")[0] for k in sys.modules} & optional) - seen
    if new:
        bad[name] = sorted(new)
print(len(names), bad)
sys.exit(1 if bad else 0)
"""


def test_no_core_module_imports_an_optional_framework() -> None:
    """Every module under mp_plugin/ (not just a few) imports without torchao, ModelOpt, ONNX, timm, …"""
    out = subprocess.run(
        [sys.executable, "-c", _EVERY_CORE_MODULE, ",".join(OPTIONAL_FRAMEWORKS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


_BLOCK_TORCHAO = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchao":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
from mp_plugin import *
import importlib, types, mp_plugin
assert callable(plan) and callable(apply) and "MPSparsifier" not in dir()
assert isinstance(mp_plugin.plan, types.FunctionType)  # the function; the module is mp_plugin.planning.build
assert importlib.import_module("mp_plugin.planning.build").PrunePlan is mp_plugin.PrunePlan
import mp_plugin.planning.build
assert isinstance(mp_plugin.plan, types.FunctionType)  # importing the planning package does not shadow it
print("ok")
"""


def test_star_import_without_torchao_and_plan_module_vs_function() -> None:
    out = subprocess.run([sys.executable, "-c", _BLOCK_TORCHAO], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_examples_and_benchmarks_compile() -> None:
    files = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        py_compile.compile(str(f), doraise=True)


def test_cli_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mp_plugin.cli.main", "--help"], capture_output=True, text=True, timeout=120
    )
    for cmd in ("analyze", "prune", "certify", "export", "bench", "demo"):
        assert cmd in out.stdout


def test_tests_install_nothing_themselves() -> None:
    """Only run.sh installs system packages; no test or test helper runs apt (a quoted command word)."""
    import re

    apt = "apt" + "-get"  # spelled so that this file does not match itself
    command = re.compile(r"[\"']" + apt + r"[\"']")  # the quoted command word: an argv element or a which() argument
    offenders = [p.name for p in sorted((ROOT / "tests").glob("*.py")) if command.search(p.read_text())]
    assert not offenders, offenders
    assert f"{apt} install" in (ROOT / "run.sh").read_text()
