"""Stage 4, per-layer budgets: the registered budget rules and the dense/2:4 mix.

:data:`mp_plugin.budget.rules.BUDGET_METHODS` is the registry. Importing this package fills
it: SEB, magnitude and uniform (:mod:`.rules`), the SEB signal variants (:mod:`.signals`),
the bounded MP rules (:mod:`.bounded`), the bulk-share rule ``mp-bulk`` (:mod:`.bulk_share`) and the calibration rules OWL and noise-floor
(:mod:`.calibrated`).
"""

from mp_plugin.budget import bounded, bulk_share, calibrated, signals  # noqa: F401  (register their methods)
