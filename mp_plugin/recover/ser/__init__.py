"""SER and the Hybrid Magnitude–SER schedule (ALGORITHM.md §2 items 4–6).

**SER** has two expansions in the authors' sources, both for the same procedure:
*sparsify–estimate–restore* (paper §3) and *Spectral Edge Reallocation*
(ESM_2, README). :class:`SpectralEdgeReallocation` runs it in four phases:

1. **over-prune** (:meth:`~SpectralEdgeReallocation.overprune`): remove the
   globally smallest fraction s + extra of the SEB scores |W_ij|/w_ℓ (the core's
   ``plan``/``global_prune_counts``, exact counts);
2. **selection** (:meth:`~SpectralEdgeReallocation.select`): train *only* the
   reservoir ℛ (the entries the over-prune removed). Kept weights and every other
   parameter are frozen (gradient masking, zero weight decay) and recorded
   |Δw_ij| = |w_after − w_before| on ℛ;
3. **restore** (:meth:`~SpectralEdgeReallocation.restore`): rank ℛ by |Δw_ij|·ρ_ℓ
   (ρ_ℓ = 1/w_ℓ by default, as in the paper's prose; ρ_ℓ = w_ℓ as in its algorithm
   box) and restore the top entries so that the sparsity is *exactly* s; the other
   reservoir entries go back to zero;
4. **frozen-mask fine-tuning** (:meth:`~SpectralEdgeReallocation.finetune`) with
   :func:`mp_plugin.recover.distill.distill` and a :class:`MaskKeeper`.

:func:`hybrid_magnitude_ser` is the protocol of the paper's Tables 1–2: along a
cumulative schedule of sparsities, exact global magnitude (plus a short
fine-tune) up to s = 0.20, then SER steps.

[D] choices the sources leave open: the reservoir holds only the entries newly
pruned by this step (``reservoir="new"``, so masks stay cumulative along a
schedule; ``"all"`` also lets earlier-pruned entries back); restored entries keep
their selection-phase values (``restore_value="trained"``; ``"dense"`` puts back
the pre-prune values); the selection loss is KD to the reference model plus
``logit_l2_weight``·mean squared logit difference (the authors'
``selection-logit-l2-weight``).

Known deviation, not yet mended: the layer weights w_ℓ (used both for the over-prune
and as ρ_ℓ) are those of the plan at s + ``extra``, not at s as ALGORITHM.md §2 writes
(near a regime boundary of the SEB table, e.g. s = 0.40 or 0.55, that is the next
regime's β), and each step refits σ₊ on the already pruned weights rather than reusing
the dense model's fits. The benchmark rows in ``benchmarks/results`` were made this way.

Modules, one job each (every public name is importable from ``mp_plugin.recover.ser``):

* :mod:`mp_plugin.recover.ser.reallocation` — :class:`SERConfig`, :class:`SERResult`,
  :class:`SpectralEdgeReallocation` (the four phases);
* :mod:`mp_plugin.recover.ser.hybrid` — :class:`HybridConfig`, :class:`HybridResult`,
  :func:`magnitude_step`, :func:`hybrid_magnitude_ser`, ``DEFAULT_SCHEDULE``;
* :mod:`mp_plugin.recover.ser.kn` — :func:`ser_to_kn` (SER masks → k:n with CAST).
"""

from __future__ import annotations

from mp_plugin.recover.ser.hybrid import (
    DEFAULT_SCHEDULE,
    HybridConfig,
    HybridResult,
    hybrid_magnitude_ser,
    magnitude_step,
)
from mp_plugin.recover.ser.kn import ser_to_kn
from mp_plugin.recover.ser.reallocation import SERConfig, SERResult, SpectralEdgeReallocation

__all__ = [
    "SERConfig",
    "SERResult",
    "SpectralEdgeReallocation",
    "HybridConfig",
    "HybridResult",
    "hybrid_magnitude_ser",
    "magnitude_step",
    "ser_to_kn",
    "DEFAULT_SCHEDULE",
]
