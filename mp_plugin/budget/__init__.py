"""Stage 4, per-layer budgets: the registered budget rules (SEB, bounded MP signals, calibrated rules) and the dense/2:4 mix."""
