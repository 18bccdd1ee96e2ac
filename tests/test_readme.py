"""The README says only what the committed results say, and its quick start is the two run.sh commands."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """``benchmarks/<name>.py`` loaded as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _headline():
    return _bench_module("headline")


def test_headline_table_is_the_one_generated_from_the_committed_json() -> None:
    headline = _headline()
    block = headline.readme_block((ROOT / "README.md").read_text())
    assert block is not None, "README.md lost its headline markers"
    assert block == headline.render(), "README headline table differs from benchmarks/headline.py: run it with --write"
    for spec in headline.ROWS:
        for f in (spec.file,) if isinstance(spec.file, str) else spec.file:
            assert (ROOT / "benchmarks" / "results" / f).is_file(), f


def test_headline_picks_the_best_of_each_family(tmp_path: Path) -> None:
    import json

    rows = [
        {"setting": "2:4", "method": "magnitude k:n", "kl": 3.0},
        {"setting": "2:4", "method": "wanda", "kl": 2.0},
        {"setting": "2:4", "method": "seb+cast", "kl": 2.5},
        {"setting": "2:4", "method": "seb+cast+perm(swap)", "kl": 1.5},
        {"setting": "50%", "method": "seb", "kl": 0.1},
        {"setting": "2:4", "method": "sparsegpt", "skipped": "n/a"},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    headline = _headline()
    spec = headline.HeadlineRow("M", "2:4", "one-shot", "r.json", "kl", higher_is_better=False)
    assert headline.best(spec, True, tmp_path) == ("seb+cast+perm(swap)", 1.5, 2)
    assert headline.best(spec, False, tmp_path) == ("wanda", 2.0, 2)
    assert "**seb+cast+perm(swap): 1.5**" in headline.render((spec,), tmp_path)
    rows += [
        {"setting": "50%", "method": "global-magnitude", "kl": 0.102},  # within 5 %: no winner is bolded
        {"setting": "50%", "method": "global budget+cast-obs+restore(seq)", "kl": 0.05},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    spec50 = headline.HeadlineRow("M", "50%", "one-shot", "r.json", "kl", higher_is_better=False)
    table = headline.render((spec50,), tmp_path)
    assert "seb: 0.1 (≈)" in table and "global-magnitude: 0.102 (≈)" in table and "**" not in table
    assert "global budget+cast-obs+restore(seq): 0.05 (better than the MP row)" in table
    assert headline.best(spec50, True, tmp_path) == ("seb", 0.1, 1)  # the non-MP-budget row is in neither family


def test_quick_start_is_exactly_the_two_run_sh_commands() -> None:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash run.sh demo", "bash run.sh test"]


def test_provably_only_next_to_the_bound_mode() -> None:
    for path in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        for line in path.read_text().splitlines():
            if re.search(r"\bprovabl|\bproven\b", line, flags=re.I):
                assert "bound" in line, f"{path.name}: a proof claim not tied to the bound mode: {line!r}"


def test_main_job_table_is_the_one_generated_from_results_main_job_json() -> None:
    headline = _headline()
    text = (ROOT / "benchmarks" / "README.md").read_text()
    block = headline.read_marked_block(text, headline.MAIN_START, headline.MAIN_END)
    assert block is not None, "benchmarks/README.md lost its main-job markers"
    assert block == headline.render_main_job(), "main-job table differs from results/main_job.json: run headline.py"
    assert "measured (empirical mode)" in block  # the main job's certificate is labelled as measured


def test_restore_section_of_benchmarks_readme_is_generated_from_the_json() -> None:
    module = _bench_module("restore_report")
    block = module.readme_block((ROOT / "benchmarks" / "README.md").read_text())
    assert block is not None, "benchmarks/README.md lost its restore markers"
    assert block == module.render(), "restore section differs: run python benchmarks/restore_report.py --write"


def test_budget_tables_are_the_ones_generated_from_the_committed_json() -> None:
    """benchmarks/README.md's layer-budget tables are ``budgets_report.readme_block`` of the results JSON."""
    report = _bench_module("budgets_report")
    block = report.readme_section((ROOT / "benchmarks" / "README.md").read_text())
    assert block is not None, "benchmarks/README.md lost its budgets markers"
    results = report.load_results()
    assert {r["model"] for r in results} >= {"minilm", "efficientnet_lite0", "fmnist_cnn"}
    assert block == report.readme_block(results), "run: python benchmarks/budgets.py --table-only --write-readme"


def test_budget_seed_table_is_the_one_generated_from_the_committed_json() -> None:
    """benchmarks/README.md's seed-spread table is ``budgets_report.seeds_block`` of results/budget_seeds.json."""
    report = _bench_module("budgets_report")
    text = (ROOT / "benchmarks" / "README.md").read_text()
    block = report.read_marked_block(text, report.SEEDS_BEGIN, report.SEEDS_END)
    assert block is not None, "benchmarks/README.md lost its budget-seeds markers"
    expected = report.seeds_block()
    assert expected is not None, "benchmarks/results/budget_seeds.json is missing"
    assert block.strip() == expected.strip(), "run: python benchmarks/budget_seeds.py --table-only --write-readme"


def test_budget_figures_draw_the_committed_json_rows(tmp_path: Path) -> None:
    """benchmarks/budgets_plot.py plots exactly the JSON rows and writes both figures the README shows."""
    pytest.importorskip("matplotlib")
    import json

    plot = _bench_module("budgets_plot")
    mix = plot.mix_series()
    rows = json.loads((ROOT / "benchmarks" / "results" / "budgets-minilm.json").read_text())["rows"]
    size45 = next(
        r
        for r in rows
        if r["part"] == "mix" and not r["restore"] and r["setting"] == "45%" and r["method"] == plot.MIX_LINES["size"]
    )
    assert mix["minilm"]["plain"]["size"][2] == size45["loss"]
    assert set(mix["efficientnet_lite0"]["restore"]) == set(plot.MIX_LINES)
    layers = plot.layer_series()
    assert all(len(v) == 3 for v in layers["fmnist_cnn"].values())
    paths = plot.draw(out_dir=tmp_path)
    assert [p.name for p in paths] == ["budgets-mix.png", "budgets-layers.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert all(f"results/{p.name}" in text and (ROOT / "benchmarks" / "results" / p.name).is_file() for p in paths)
