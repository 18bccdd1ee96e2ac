"""Errors a distillation run raises on purpose (all :class:`~mp_plugin.errors.MPPluginError`)."""

from __future__ import annotations

from mp_plugin.errors import MPPluginError

__all__ = ["DenseStudentError", "NonFiniteLossError", "DataMismatchError"]


class DenseStudentError(MPPluginError):
    """The student has no masks and no plan: training it would silently produce a dense model."""


class NonFiniteLossError(MPPluginError, FloatingPointError):
    """The loss became NaN or infinite; the run stops at that step."""


class DataMismatchError(MPPluginError, ValueError):
    """The data does not fit the model (class count, label range, teacher/student logits)."""
