"""sopq: per-layer activation-weighted codebook quantization of transformer weights."""
