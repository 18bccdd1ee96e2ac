"""Shared benchmark plumbing: machine facts, versions, load average, JSON results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None when absent)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "numpy", "scipy", "mp-plugin", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """CPU model, core count, platform, current load average and date."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1_5_15": list(os.getloadavg()),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(name: str, payload: dict, packages: tuple[str, ...] = ()) -> Path:
    """Write ``benchmarks/results/<name>.json`` with machine and version info added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "versions": versions(*packages), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def read_marked_block(text: str, start: str, end: str) -> str | None:
    """The text between the marker lines ``start`` and ``end`` (without the newline before ``end``), or None."""
    import re

    m = re.search(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), text, flags=re.S)
    return m.group(1) if m else None


def write_marked_block(path: Path, start: str, end: str, block: str) -> None:
    """Replace the text between the marker lines in ``path`` by ``block``.

    Raises:
        SystemExit: the markers are missing.
    """
    import re

    text = path.read_text()
    if read_marked_block(text, start, end) is None:
        raise SystemExit(f"{path}: markers {start!r} … {end!r} not found")
    pattern = re.escape(start) + r"\n.*?\n?" + re.escape(end)
    path.write_text(re.sub(pattern, lambda _: f"{start}\n{block}\n{end}", text, flags=re.S))


CLOSE = 0.05  # losses within 5 % of each other: one run cannot separate them


def close(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether two fidelities are within :data:`CLOSE` of each other, compared as losses to dense
    (1 − cosine, or the KL itself); report tables then name no winner."""
    la, lb = (1.0 - a, 1.0 - b) if higher_is_better else (a, b)
    return abs(la - lb) <= CLOSE * max(abs(la), abs(lb))


# result rows of our own selection + restore under a non-MP budget: neither an MP method nor an outside baseline
NEITHER_PREFIXES = ("uniform budget", "global budget")
