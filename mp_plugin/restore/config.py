"""Settings of prune–restore (ALGORITHM.md §7), one config object for every route."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from mp_plugin.errors import MPPluginError

__all__ = ["RestoreConfig", "SOLVERS", "resolve_restore"]

SOLVERS = ("auto", "direct", "obs", "cg")


@dataclass(frozen=True)
class RestoreConfig:
    """How the kept weights are re-solved after a mask is chosen.

    For every pruned layer with input Gram H₀ = XᵀX over all its calibration rows
    (tokens and conv positions flattened, conv inputs in the k:n layout) the kept
    weights of each output row become the minimiser of (ŵ − w)ᵀ H (ŵ − w) with
    ŵ = 0 off the mask, H = H₀ + λI and λ = ``damp`` · mean diag(H₀).

    Attributes:
        damp: δ, the damping relative to mean diag(H₀) (SparseGPT's reference: 0.01).
        solver: ``"direct"`` (exact: one Cholesky solve of H_KK per output row),
            ``"obs"`` (SparseGPT's column sweep on the Cholesky factor of H⁻¹ with the
            mask fixed: fast, slightly above the optimum), ``"cg"`` (the OBS sweep as
            warm start, then conjugate gradients on the exact objective until the
            relative residual is below ``tol``) or ``"auto"`` (``direct`` when its
            cost is small, else ``cg``).
        tol: relative residual of the ``cg`` solver (1e-3 leaves the objective within about 1e-4 of
            its optimum on real layers, at a third of the iterations of 1e-6).
        max_iter: iteration cap of the ``cg`` solver. On billion-parameter models ``max_iter=10``
            with ``dtype="float32"`` keeps the restored output error within a few per cent of the
            converged one at a fraction of the time (measured: benchmarks/README.md "Scale").
        blocksize: column block of the OBS sweep ("lazy batch", 128 in the reference).
        sequential: prune and restore in forward order, one block at a time, with
            each block's calibration inputs taken from the model already pruned and
            restored before it; only the current block's H matrices are held.
        dtype: ``"float64"`` or ``"float32"``, the precision of H and the solves.
        max_rows: use at most this many input rows per layer for H (None = all).
        min_rows_factor: warn (recorded in the plan) when a layer has fewer than
            this many calibration rows per input column: below 1 H is singular and λ
            does the work; below a few per input the least-squares solution starts to
            fit the calibration rows rather than the data distribution (measured on
            random MLPs here: 2 rows per input already made held-out error worse).
    """

    damp: float = 0.01
    solver: Literal["auto", "direct", "obs", "cg"] = "auto"
    tol: float = 1e-3
    max_iter: int = 200
    blocksize: int = 128
    sequential: bool = False
    dtype: Literal["float64", "float32"] = "float64"
    max_rows: int | None = None
    min_rows_factor: float = 4.0

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, (int, float)) and self.damp > 0 and self.damp == self.damp):
            raise MPPluginError(f"RestoreConfig.damp must be a positive number, got {self.damp!r}")
        if self.solver not in SOLVERS:
            raise MPPluginError(f"RestoreConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.dtype not in ("float64", "float32"):
            raise MPPluginError(f"RestoreConfig.dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if not (isinstance(self.blocksize, int) and self.blocksize > 0):
            raise MPPluginError(f"RestoreConfig.blocksize must be a positive int, got {self.blocksize!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter > 0):
            raise MPPluginError(f"RestoreConfig.max_iter must be a positive int, got {self.max_iter!r}")
        if self.max_rows is not None and not (isinstance(self.max_rows, int) and self.max_rows > 0):
            raise MPPluginError(f"RestoreConfig.max_rows must be None or a positive int, got {self.max_rows!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RestoreConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise MPPluginError(f"unknown RestoreConfig fields {sorted(extra)}; known: {sorted(known)}")
        return cls(**d)


def resolve_restore(restore: Any) -> RestoreConfig | None:
    """``False``/``None`` → None, ``True`` → defaults, a dict or a :class:`RestoreConfig` as given."""
    if restore is None or restore is False:
        return None
    if restore is True:
        return RestoreConfig()
    if isinstance(restore, RestoreConfig):
        return restore
    if isinstance(restore, dict):
        return RestoreConfig.from_dict(restore)
    raise MPPluginError(f"restore must be a bool, a dict or a RestoreConfig, got {type(restore).__name__}")
