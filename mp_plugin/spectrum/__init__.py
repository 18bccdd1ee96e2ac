"""Random-matrix spectra of layer weights: the MP law, Tracy–Widom edges, BEMA fits."""

from mp_plugin.spectrum.eigen import as_matrix, gram_matrix, squared_singular_values
from mp_plugin.spectrum.fit import (
    SpectralFit,
    fit_from_eigenvalues,
    fit_many,
    fit_marchenko_pastur,
    float32_sigma_error,
)
from mp_plugin.spectrum.mp_law import mp_cdf, mp_density, mp_edges, mp_quantile
from mp_plugin.spectrum.tracy_widom import tracy_widom_cdf, tracy_widom_quantile

__all__ = [
    "SpectralFit",
    "as_matrix",
    "fit_from_eigenvalues",
    "float32_sigma_error",
    "gram_matrix",
    "fit_many",
    "fit_marchenko_pastur",
    "mp_cdf",
    "mp_density",
    "mp_edges",
    "mp_quantile",
    "squared_singular_values",
    "tracy_widom_cdf",
    "tracy_widom_quantile",
]
