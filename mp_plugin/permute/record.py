"""What ``permute_channels`` folded into a model, as a value the caller holds.

Nothing is attached to the model: :func:`~mp_plugin.permute.permute_channels`
returns a :class:`PermutationRecord`, and ``apply(..., permute=...)`` stores its
JSON form in the plan (``plan.applied["permutation"]``, plan schema version 2),
so it survives DDP, ``torch.compile`` or any other wrapper, ``state_dict``
reloads and ``PrunePlan.save``/``load``. The certificate and the checkpoint code
read it back with :meth:`PermutationRecord.from_plan` (or
:func:`resolve_permutation`, which also takes a record).

:func:`folds_to_data` turns the fold list into lists/dicts/ints only (safe for
``torch.load(weights_only=True)`` and JSON); :func:`folds_from_data` is the inverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mp_plugin.errors import MPPluginError, PlanFormatError
from mp_plugin.permute.attention import AttentionSite
from mp_plugin.permute.graph import Coupling
from mp_plugin.permute.report import PermutationReport, PermutedLayer, SkippedPermutation

__all__ = ["PermutationRecord", "folds_from_data", "folds_to_data", "resolve_permutation"]

Fold = tuple[Coupling | AttentionSite, torch.Tensor]


def site_modules(site: Coupling | AttentionSite) -> list[str]:
    """The module names a fold touches (to check that a model has them before replaying it)."""
    if isinstance(site, AttentionSite):
        return [site.qkv, site.proj]
    return [*site.producers, *(name for name, _ in site.ops), *site.consumers]


def folds_to_data(folds: list[Fold]) -> list[dict[str, Any]]:
    """``[{"kind": "coupling"|"attention", "site": {...}, "perm": [int, ...]}, ...]``."""
    out = []
    for site, perm in folds:
        kind = "coupling" if isinstance(site, Coupling) else "attention"
        out.append({"kind": kind, "site": asdict(site), "perm": [int(i) for i in perm]})
    return out


def folds_from_data(data: list[dict[str, Any]]) -> list[Fold]:
    """Inverse of :func:`folds_to_data`."""
    folds: list[Fold] = []
    for entry in data:
        site = dict(entry["site"])
        if entry["kind"] == "coupling":
            site["ops"] = [(name, [tuple(t) for t in tensors]) for name, tensors in site["ops"]]
            site["params"] = [tuple(p) for p in site["params"]]
            folds.append((Coupling(**site), torch.tensor(entry["perm"], dtype=torch.long)))
        elif entry["kind"] == "attention":
            folds.append((AttentionSite(**site), torch.tensor(entry["perm"], dtype=torch.long)))
        else:
            raise MPPluginError(f"unknown fold kind {entry['kind']!r} in a permutation record")
    return folds


def _report_from_dict(d: dict[str, Any]) -> PermutationReport:
    d = dict(d)
    d["permuted"] = [PermutedLayer(**p) for p in d.get("permuted", [])]
    d["skipped"] = [SkippedPermutation(**s) for s in d.get("skipped", [])]
    return PermutationReport(**d)


@dataclass
class PermutationRecord:
    """The channel permutations folded into a model's weights, in the order they were folded.

    Attributes:
        permutations: consumer layer name → list[int] of length C_in: new input channel s
            is old channel ``perm[s]``, composed over every ``permute_channels`` call.
        folds: (coupling or attention site, permutation) per fold, in order; replaying
            them on a copy of the dense model gives it the same channel basis
            (:func:`~mp_plugin.permute.align_to_permuted`).
        report: the :class:`PermutationReport` of the last ``permute_channels`` call
            (None when it was not recorded).

    Layer names are those of the unwrapped model (no ``module.``/``_orig_mod.`` prefix).
    """

    permutations: dict[str, list[int]] = field(default_factory=dict)
    folds: list[Fold] = field(default_factory=list)
    report: PermutationReport | None = None

    def __bool__(self) -> bool:
        return bool(self.permutations or self.folds)

    def extended(
        self, perms: dict[str, torch.Tensor], folds: list[Fold], report: PermutationReport
    ) -> PermutationRecord:
        """A new record: this one followed by one more ``permute_channels`` call (``perms`` composed)."""
        out = {k: list(v) for k, v in self.permutations.items()}
        for name, perm in perms.items():
            prev = out.get(name)
            out[name] = (torch.tensor(prev)[perm] if prev is not None else perm).tolist()
        return PermutationRecord(out, [*self.folds, *folds], report)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``plan.applied["permutation"]`` holds)."""
        return {
            "permutations": {k: [int(i) for i in v] for k, v in self.permutations.items()},
            "folds": folds_to_data(self.folds),
            "report": None if self.report is None else self.report.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PermutationRecord:
        """Inverse of :meth:`to_dict`.

        Raises:
            PlanFormatError: a fold's site lacks or mistypes a field, its permutation's length is
                not the site's channel count, or the report does not have the report's fields.
        """
        try:
            report = d.get("report")
            record = cls(
                {k: [int(i) for i in v] for k, v in dict(d.get("permutations") or {}).items()},
                folds_from_data(d.get("folds") or []),
                None if report is None else _report_from_dict(report),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanFormatError(f"the plan's permutation record is malformed ({type(exc).__name__}: {exc})") from exc
        for i, (site, perm) in enumerate(record.folds):
            bad_site = not isinstance(site.channels, int) or site.channels < 1
            if bad_site or len(perm) != site.channels:
                raise PlanFormatError(
                    f"the plan's permutation record: folds[{i}] permutes {len(perm)} channels, its site "
                    f"has {site.channels}"
                )
        return record

    @classmethod
    def from_plan(cls, plan: Any) -> PermutationRecord | None:
        """The record a :class:`~mp_plugin.planning.plan.PrunePlan` holds, or None when it has none."""
        data = plan.permutation
        return None if data is None else cls.from_dict(data)

    def save_to(self, plan: Any) -> None:
        """Store this record in ``plan.applied["permutation"]`` (saved with ``plan.save``)."""
        plan.applied["permutation"] = self.to_dict()


def resolve_permutation(source: Any) -> PermutationRecord | None:
    """A :class:`PermutationRecord` from a record, a plan (its ``applied["permutation"]``), its dict, or None."""
    if source is None or isinstance(source, PermutationRecord):
        return source or None
    if isinstance(source, dict):
        return PermutationRecord.from_dict(source) if source else None
    if hasattr(source, "applied"):
        return PermutationRecord.from_plan(source)
    raise MPPluginError(
        f"expected a PermutationRecord, a PrunePlan or None for the channel permutation, got {type(source).__name__}"
    )
