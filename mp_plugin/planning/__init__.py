"""Stage 5, the prune plan: build it from fits and budgets, validate, save and load it."""
