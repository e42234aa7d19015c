"""sopq: per-layer activation-weighted codebook quantization of transformer weights.

`sopq.load(packed_dir)` returns a transformers model that computes from the packed codes
(sopq/packed_model.py).
"""


def __getattr__(name):
    # Lazy, so that importing any sopq module does not import transformers through this one.
    if name == "load":
        from sopq.packed_model import load

        return load
    raise AttributeError(f"module 'sopq' has no attribute {name!r}")
