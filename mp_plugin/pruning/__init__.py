"""Stage 7, apply a plan to a model: masks, permutation, restore, and the sparsity report."""
