"""Singular values of layer weights, fast: eigenvalues of the smaller Gram side.

A weight is read as a 2-D matrix in PyTorch order (rows = out, cols =
in·kh·kw). For a p×n matrix with p ≤ n, the squared singular values are the
eigenvalues of the p×p Gram matrix, which ``eigvalsh`` returns several times
faster than an SVD. The Gram matrix is accumulated over slices of the long
side (:func:`gram_matrix`), so a bf16 weight is never copied whole to a wider
dtype. Gram matrices of one shape are stacked, up to a byte budget, and solved
in one batched call, on the device the weights live on (CUDA included).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from mp_plugin.errors import ConfigError, InvalidWeightError

__all__ = ["as_matrix", "gram_matrix", "resolve_gram_dtype", "squared_singular_values"]

_GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def resolve_gram_dtype(gram_dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float64``/``torch.float32`` (or their names ``"float64"``/``"float32"``) as a torch dtype.

    Raises:
        ConfigError: any other value (fp16/bf16 have no eigen-solver and too little range for a Gram product).
    """
    if isinstance(gram_dtype, str):
        key = gram_dtype.strip().lower().removeprefix("torch.")
        key = {"double": "float64", "float": "float32"}.get(key, key)
        if key in _GRAM_DTYPES:
            return _GRAM_DTYPES[key]
    elif gram_dtype in (torch.float64, torch.float32):
        return gram_dtype
    raise ConfigError(f"gram_dtype must be 'float64' or 'float32' (or torch.float64/torch.float32), got {gram_dtype!r}")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear (out, in) or Conv (out, in/groups, *kernel) weight as out × (in·k)."""
    if not isinstance(weight, torch.Tensor):
        raise InvalidWeightError(f"expected a torch.Tensor, got {type(weight).__name__}")
    if weight.is_meta:
        raise InvalidWeightError("weight is on the meta device: materialise it before fitting")
    if weight.dim() < 2:
        raise InvalidWeightError(f"weight must have ≥2 dims (Linear or Conv), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise InvalidWeightError("weight is empty")
    if weight.is_complex() or not weight.is_floating_point():
        raise InvalidWeightError(
            f"weight dtype {weight.dtype} is not a real floating-point type: convert it (e.g. .float()) before fitting"
        )
    mat = weight.detach().reshape(weight.shape[0], -1)
    lo, hi = torch.aminmax(mat)  # NaN propagates to both; one pass, no mask tensor
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise InvalidWeightError("weight contains NaN or Inf values")
    return mat


_LOWER_BLOCKS = 8  # row blocks of the lower-triangle Gram: (k+1)/2k of the full product's flops


def gram_matrix(
    mat: torch.Tensor,
    gram_dtype: torch.dtype = torch.float64,
    chunk_elements: int = 1 << 22,
    out: torch.Tensor | None = None,
    lower_only: bool = False,
) -> torch.Tensor:
    """The smaller-side Gram matrix of a 2-D ``mat`` (p × p, p = min(rows, cols)), on ``mat``'s device.

    For rows ≤ cols it is M Mᵀ, otherwise Mᵀ M (squared weight units). The long
    side is read in slices of about ``chunk_elements`` entries, each converted to
    ``gram_dtype`` on its own, so the workspace is the p × p result plus one slice:
    no full-size float32/float64 copy of a bf16/fp16 weight is made. ``out``
    (p × p, ``gram_dtype``, same device) receives the result when given.

    With ``lower_only`` only the lower triangle (diagonal included) is computed, in
    row blocks, for about 0.56× the flops; the entries above the diagonal are then
    unspecified. ``torch.linalg.eigvalsh(..., UPLO="L")`` reads only the lower triangle.
    """
    wide = mat.shape[0] <= mat.shape[1]
    p, n = (mat.shape[0], mat.shape[1]) if wide else (mat.shape[1], mat.shape[0])
    step = max(1, int(chunk_elements) // max(1, p))
    if out is None:
        out = torch.empty(p, p, dtype=gram_dtype, device=mat.device)
    block = -(-p // _LOWER_BLOCKS) if lower_only else p
    for start in range(0, n, step):
        piece = (mat[:, start : start + step] if wide else mat[start : start + step].T).to(gram_dtype)
        for row in range(0, p, block):
            stop = min(p, row + block)
            target = out[row:stop, :stop]
            if start == 0:
                torch.matmul(piece[row:stop], piece[:stop].T, out=target)
            else:
                target.addmm_(piece[row:stop], piece[:stop].T)
    return out


def _gram_eigvals(mats: Sequence[torch.Tensor], gram_dtype: torch.dtype) -> torch.Tensor:
    """Ascending eigenvalues (float64, ≥ 0) of the smaller Gram side of same-shaped 2-D matrices, (B, p)."""
    p = min(mats[0].shape)
    grams = torch.zeros(len(mats), p, p, dtype=gram_dtype, device=mats[0].device)
    for j, m in enumerate(mats):
        gram_matrix(m, gram_dtype, out=grams[j], lower_only=True)
    return torch.linalg.eigvalsh(grams, UPLO="L").to(torch.float64).clamp_min(0.0)


def squared_singular_values(
    weights: Sequence[torch.Tensor],
    gram_dtype: torch.dtype = torch.float64,
    batch_size: int = 16,
    max_batch_bytes: int = 1 << 27,
) -> list[torch.Tensor]:
    """Return s² (ascending, float64, on CPU) for each weight, batching equal shapes.

    Args:
        weights: tensors of any supported shape; each is read via :func:`as_matrix`.
        gram_dtype: dtype of the Gram product and eigen-solve. float64
            (default) is exact to ~1e-15 relative; float32 is about twice as
            fast and exact to ~1e-7 relative to the largest eigenvalue
            (``benchmarks/analysis_speed.py`` measures both against an SVD;
            :func:`mp_plugin.spectrum.fit_many` decides per layer when float32 is enough).
        batch_size: most matrices of one shape solved in one batched call.
        max_batch_bytes: most bytes of Gram matrices held at once (a batch is cut
            to fit; one matrix is always allowed). Peak workspace is about this
            plus one slice of :func:`gram_matrix`, whatever the weights' size.

    Returns:
        One 1-D float64 tensor of length min(N, M) per weight: the squared
        singular values sorted ascending.
    """
    gram_dtype = resolve_gram_dtype(gram_dtype)
    mats = [w if w.dim() == 2 and not w.requires_grad else as_matrix(w) for w in weights]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        groups[(tuple(m.shape), m.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    itemsize = torch.empty(0, dtype=gram_dtype).element_size()
    for (shape, _), idx in groups.items():
        per = min(shape) ** 2 * itemsize
        size = max(1, min(batch_size, int(max_batch_bytes) // max(1, per)))
        for start in range(0, len(idx), size):
            chunk = idx[start : start + size]
            ev = _gram_eigvals([mats[i] for i in chunk], gram_dtype).cpu()
            for j, i in enumerate(chunk):
                out[i] = ev[j]
    return out  # type: ignore[return-value]
