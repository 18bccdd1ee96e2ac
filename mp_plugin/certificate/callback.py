"""Certify during training: a callback for any plain PyTorch loop (and our distillation loop)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mp_plugin.certificate.core import certify
from mp_plugin.certificate.inputs import Batch
from mp_plugin.certificate.result import Certificate
from mp_plugin.errors import CertificateInputError
from mp_plugin.masks.select import fold_parametrizations

__all__ = ["CertificateCallback"]


class CertificateCallback:
    """Certify the model being pruned/trained against a frozen dense snapshot every N steps.

    Usage::

        cb = CertificateCallback(dense, calib_x, calib_y, every_n_steps=100, json_path="cert.json")
        for step, batch in enumerate(loader):
            ...optimizer.step()...
            cb.step(model, step)

    Args:
        dense_model: the reference model; a frozen copy is taken now, so it may be the very
            object that is trained afterwards.
        calib_batch: the fixed calibration batch T (tensor, tuple or dict).
        calib_labels: optional (|T|,) labels.
        every_n_steps: certify when ``step % every_n_steps == 0``.
        mode: ``"empirical"``, ``"bound"`` or ``"jacobian"``.
        log: called with each history record (e.g. ``print`` or a logger's method).
        json_path: if set, the whole history is rewritten there after each certification.
        lambdas: (λ₁, λ₂) for the elastic-net check.
        **certify_kwargs: passed on to :func:`certify` (``layers``, ``sequential``, …).
    """

    def __init__(
        self,
        dense_model: nn.Module,
        calib_batch: Batch,
        calib_labels: torch.Tensor | None = None,
        every_n_steps: int = 100,
        mode: str = "empirical",
        log: Callable[[dict], Any] | None = None,
        json_path: str | Path | None = None,
        lambdas: Sequence[float] | None = None,
        **certify_kwargs: Any,
    ) -> None:
        if every_n_steps < 1:
            raise CertificateInputError(f"every_n_steps must be ≥ 1, got {every_n_steps}")
        self.dense = fold_parametrizations(dense_model).eval()
        self.batch = calib_batch
        self.labels = calib_labels
        self.every_n_steps = int(every_n_steps)
        self.mode = mode
        self.log = log
        self.json_path = None if json_path is None else Path(json_path)
        self.lambdas = lambdas
        self.certify_kwargs = certify_kwargs
        self.history: list[dict] = []
        self.last: Certificate | None = None

    def certify_now(self, model: nn.Module, step: int = -1) -> Certificate:
        """Certify ``model`` now, append a record to :attr:`history`, log and write JSON."""
        cert = certify(
            self.dense, model, self.batch, self.labels, mode=self.mode, lambdas=self.lambdas, **self.certify_kwargs
        )
        record = {
            "step": int(step),
            "mode": cert.mode,
            "budget": cert.budget,
            "budget_kind": cert.budget_kind,
            "eta_kind": cert.eta_kind,
            "preserved_fraction": cert.preserved_fraction,
            "accuracy_change_bound": cert.accuracy_change_bound,
            "agreement": cert.measured["agreement"],
            "violations": cert.violations,
            "n_layers": len(cert.layers),
        }
        if cert.elastic_net is not None:
            record["elastic_net_certified"] = cert.elastic_net["certified"]
        self.history.append(record)
        self.last = cert
        if self.log is not None:
            self.log(record)
        if self.json_path is not None:
            self.save_json(self.json_path)
        return cert

    def step(self, model: nn.Module, step: int) -> Certificate | None:
        """Call once per training step; certifies when ``step`` is a multiple of ``every_n_steps``."""
        if step % self.every_n_steps:
            return None
        return self.certify_now(model, step)

    def save_json(self, path: str | Path) -> Path:
        """Write the history (one record per certification) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"every_n_steps": self.every_n_steps, "history": self.history}, indent=1))
        return path
