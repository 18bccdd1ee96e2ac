"""Tracy–Widom (β = 1) distribution function and quantiles.

F₁(s) is evaluated as the Fredholm determinant det(I − K_s) of the kernel
K_s(x, y) = ½·Ai((x + y)/2) on L²(s, ∞), discretised with Gauss–Legendre
quadrature on a truncated interval (Ai decays like exp(−⅔x^{3/2}), so the tail
beyond s + 16 is far below float64 resolution). Quantiles come from Brent's
method and are cached.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import airy

from mp_plugin.errors import ConfigError

__all__ = ["tracy_widom_cdf", "tracy_widom_quantile"]

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(80)
_SPAN = 16.0


def tracy_widom_cdf(s: float) -> float:
    """F₁(s), the β=1 Tracy–Widom distribution function (GOE largest eigenvalue)."""
    s = float(s)
    if s > 12.0:
        return 1.0
    if s < -12.0:
        return 0.0
    x = s + 0.5 * _SPAN * (_NODES + 1.0)
    w = 0.5 * _SPAN * _WEIGHTS
    sw = np.sqrt(w)
    kernel = 0.5 * airy(0.5 * (x[:, None] + x[None, :]))[0]
    mat = np.eye(len(x)) - sw[:, None] * kernel * sw[None, :]
    return float(np.clip(np.linalg.det(mat), 0.0, 1.0))


@lru_cache(maxsize=128)
def tracy_widom_quantile(q: float) -> float:
    """The q-quantile t_q of TW₁, e.g. t_0.5 ≈ −1.2686, t_0.95 ≈ 0.9793 (dimensionless)."""
    q = float(q)
    if not 0.0 < q < 1.0:
        raise ConfigError(f"quantile level must lie in (0, 1), got {q}")
    lo, hi = tracy_widom_cdf(-10.0), tracy_widom_cdf(8.0)
    if not lo < q < hi:  # the tabulated range of the CDF: about (7e-9, 1 − 8e-9)
        raise ConfigError(
            f"quantile level {q} lies outside the range this TW₁ CDF covers, ({lo:.1e}, 1 − {1 - hi:.1e}); "
            "for the edge, β = 1 − q must not be that close to 0 or 1"
        )
    return float(brentq(lambda s: tracy_widom_cdf(s) - q, -10.0, 8.0, xtol=1e-10))
