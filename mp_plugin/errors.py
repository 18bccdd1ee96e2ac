"""Named errors raised by mp_plugin.

Every failure that a user can cause (bad weights, impossible sparsity, a model
with nothing to prune, an unsupported pattern) raises a subclass of
:class:`MPPluginError`, so callers can catch one base class and nothing ever
crashes deep inside linear algebra.
"""

from __future__ import annotations


class MPPluginError(Exception):
    """Base class of every error mp_plugin raises on purpose."""


class InvalidWeightError(MPPluginError, ValueError):
    """A weight tensor cannot be analysed (wrong rank, NaN/Inf, meta device, empty)."""


class SpectrumFitError(MPPluginError, ValueError):
    """The Marchenko–Pastur fit is undefined for this matrix (e.g. a 1×n layer)."""


class InvalidSparsityError(MPPluginError, ValueError):
    """A requested sparsity is outside [0, 1)."""


class PatternError(MPPluginError, ValueError):
    """A sparsity pattern string is malformed or cannot be applied to a layer."""


class NoPrunableLayersError(MPPluginError, ValueError):
    """The model contains no layer that the selection rules accept."""


class PlanMismatchError(MPPluginError, ValueError):
    """A plan does not match the model it is applied to."""


class NotCertifiable(MPPluginError):
    """The certificate cannot bound an operation downstream of the pruned layer."""


class ArchitectureMismatchError(MPPluginError, ValueError):
    """Two models that should share one architecture (dense vs pruned) differ in modules or shapes."""


class CertificateInputError(MPPluginError, ValueError):
    """A certificate input is malformed: batch/labels sizes, logits shape, unknown layer or mode."""


class NonFiniteActivationError(MPPluginError, ValueError):
    """An activation or logit captured while certifying is NaN or infinite."""


class DatasetUnavailable(MPPluginError, FileNotFoundError):
    """A data set that ships offline (e.g. Debian's ``dataset-fashion-mnist``) is not installed here."""


class ConfigError(MPPluginError, ValueError):
    """An argument or configuration value is invalid (unknown name, out of range, wrong type)."""


class CalibrationError(MPPluginError, ValueError):
    """A calibration or example batch is empty, non-finite, or does not run through the model."""


class PlanFormatError(MPPluginError, ValueError):
    """A plan file or plan object does not follow the plan schema (missing keys, wrong types, tampered counts)."""


class CheckpointError(MPPluginError, ValueError):
    """A checkpoint file cannot be read, or does not fit the model architecture it is loaded into."""


class DataError(MPPluginError, ValueError):
    """An input file or data argument cannot be used: a corrupt image, an image size ≤ 0, a non-positive count."""
