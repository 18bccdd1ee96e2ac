"""Stage 2, masks: k:n and unstructured mask selection, the CAST projection, MAC counts, and the one mask keeper."""
