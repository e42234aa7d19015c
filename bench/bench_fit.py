"""CPU time of the SOP fit per million weights, on real layers, single-threaded.

For a subset of layers of a fetched model with its calibration Grams (the pipeline's outputs),
times at b = 6 (the configured group 32, fp16 scales, free codebook):
- the fit without error feedback (codebook + scales + nearest codes),
- the fit with error feedback, the GPTQ factor of H computed inside (what the fit costs alone),
- the sensitivity stage's unit of work: every allowed width 4..8 of one layer with one shared
  GPTQ factor, against five independent fits (the factor computed five times),
and prints seconds per million weights and the ratios, all measured in this run.

    PYTHONPATH=$PWD python bench/bench_fit.py --model resources/models/llama \
        --calib results/llama/calib --kind causal_lm --layers 'model\\.layers\\.(3|17)\\.'
"""
from __future__ import annotations

import argparse
import platform
import re
import time
from datetime import datetime, timezone

import torch

from sopq.model import get_weight, load_model, quantizable_layers
from sopq.quantize import inverse_cholesky, quantize_layer
from sopq.sensitivity import GramLookup

BITS = 6
ALL_BITS = (4, 5, 6, 7, 8)


def timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="directory with stats.parquet and grams.safetensors")
    parser.add_argument("--kind", default="causal_lm")
    parser.add_argument("--layers", default=r"model\.layers\.3\.", help="regular expression on layer names")
    parser.add_argument("--group", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, _ = load_model(args.model, args.kind)
    layers = {n: m for n, m in quantizable_layers(model, [".*"], ["lm_head", "embed", "pooler"]).items()
              if re.search(args.layers, n)}
    if not layers:
        raise SystemExit(f"no layer matches {args.layers!r}")
    gram = GramLookup.from_files(f"{args.calib}/stats.parquet", f"{args.calib}/grams.safetensors")
    totals = dict.fromkeys(("no_ef", "ef", "all_bits_shared", "all_bits_separate"), 0.0)
    weights = 0
    for name, module in layers.items():
        W, H = get_weight(module).clone(), gram[name].clone()
        weights += W.numel()
        totals["no_ef"] += timed(lambda: quantize_layer(W, H, BITS, args.group, "fp16", False))
        totals["ef"] += timed(lambda: quantize_layer(W, H, BITS, args.group, "fp16", True))

        def shared():
            hinv = inverse_cholesky(H)
            for bits in ALL_BITS:
                quantize_layer(W, H, bits, args.group, "fp16", True, hinv_chol=hinv)

        totals["all_bits_shared"] += timed(shared)
        totals["all_bits_separate"] += timed(lambda: [quantize_layer(W, H, b, args.group, "fp16", True) for b in ALL_BITS])
    per_m = {key: value / weights * 1e6 for key, value in totals.items()}
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread; {len(layers)} layers, {weights / 1e6:.2f} M weights ({args.layers})")
    print(f"fit b={BITS} without error feedback: {per_m['no_ef']:.3f} CPU s per M weights")
    print(f"fit b={BITS} with error feedback:    {per_m['ef']:.3f} CPU s per M weights "
          f"({per_m['ef'] / per_m['no_ef']:.2f}x without)")
    print(f"sensitivity, b=4..8, shared GPTQ factor: {per_m['all_bits_shared']:.3f} CPU s per M weights; "
          f"separate factors: {per_m['all_bits_separate']:.3f} ({per_m['all_bits_separate'] / per_m['all_bits_shared']:.2f}x)")


if __name__ == "__main__":
    main()
