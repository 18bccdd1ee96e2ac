"""Stage 8, recover accuracy after pruning: the distillation recipe (the one training loop), SER, MP-regularised training and ToMe."""
