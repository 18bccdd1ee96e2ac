"""Stage 0, the model's prunable layers: discovery, weight layout, k:n patterns, calibration capture."""
