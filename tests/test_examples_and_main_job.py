"""Every script in examples/ runs (small settings), and the main job runs through ``mp-plugin demo``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# what each example must print when it worked (a k:n check, a sparsity report, a certificate)
EXPECT = {
    "python_api.py": ["k:n valid: yes", "certificate: MEASURED", "dense/2:4 mix (measured)"],
    "torchao_sparsify.py": ["k:n valid: yes", "embedding retention vs dense"],
    "modelopt_distill.py": ["2:4, after distillation", "k:n valid: yes"],
    "torch_ao_pruning.py": ["after:", "layers"],
}
NEEDS = {
    "torchao_sparsify.py": "torchao",
    "modelopt_distill.py": "modelopt",
    "python_api.py": "efficientnet_lite_pytorch",
}


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MP_PLUGIN_EXAMPLE_QUICK="1", MP_PLUGIN_EXAMPLE_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    return env


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES} == set(EXPECT)


_RUN_ALL = """
import contextlib, pathlib, runpy, sys, traceback
out = pathlib.Path(sys.argv[1])
for path in sys.argv[2:]:
    name = pathlib.Path(path).name
    with open(out / (name + ".out"), "w") as log, contextlib.redirect_stdout(log):
        try:
            runpy.run_path(path, run_name="__main__")
            status = "ok"
        except BaseException:  # report and go on to the next example
            status = traceback.format_exc()
    (out / (name + ".status")).write_text(status)
"""


def test_every_example_runs(tmp_path: Path) -> None:
    """All examples in one interpreter (one torch import instead of four), each checked for its own output."""
    missing = [name for name, mod in NEEDS.items() if importlib.util.find_spec(mod) is None]
    scripts = [str(p) for p in EXAMPLES if p.name not in missing]
    logs = tmp_path / "logs"
    logs.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _RUN_ALL, str(logs), *scripts],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    for script in scripts:
        name = Path(script).name
        status = (logs / f"{name}.status").read_text()
        text = (logs / f"{name}.out").read_text()
        assert status == "ok", (name, status[-4000:])
        for expected in EXPECT[name]:
            assert expected in text, (name, expected, text[-3000:])


def test_main_job_through_the_command_line(tmp_path: Path) -> None:
    """``mp-plugin demo`` (the console script), quick setting: one baseline and one MP variant."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("onnxruntime")
    exe = Path(sys.executable).with_name("mp-plugin")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mp_plugin.cli.main"]
    argv = ["demo", "efficientnet_lite0", "--n-eval", "4", "--n-calib", "4", "--image-size", "64", "--threads", "1"]
    argv += ["--out", str(tmp_path / "out"), "--variants", "magnitude-2-4", "mp-2-4-seb-cast"]
    out = subprocess.run([*cmd, *argv], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in out.stdout
    assert "falling back to the measured (empirical) certificate" in out.stdout
    assert "provabl" not in out.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["magnitude 2:4", "MP 2:4 (SEB+CAST)"]
    assert results["certificate"]["claim"] == "measured" and results["onnx"]["pattern_ok"]
    assert {"esd.png", "budgets.png", "plan.json", "certificate.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    bad = subprocess.run([*cmd, "demo", "--variants", "nope"], env=_env(tmp_path), capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown variant" in bad.stderr.strip().splitlines()[-1]
