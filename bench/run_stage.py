"""Run one checkout's evaluate or importance script on one family's existing pipeline outputs,
as the rule would (config.yaml's parameters), writing into a scratch directory.

    PYTHONPATH=CHECKOUT /usr/bin/time -v python bench/run_stage.py evaluate --code CHECKOUT \\
        --data PIPELINE_ROOT --family llama --out DIR

CHECKOUT must be first on PYTHONPATH (its sopq is the one imported). Used for
bench/RESULTS-streaming.md (the evaluate and importance stages before and after streaming).
"""
import argparse
import runpy
from pathlib import Path
from types import SimpleNamespace

import yaml

parser = argparse.ArgumentParser()
parser.add_argument("stage", choices=["evaluate", "importance"])
parser.add_argument("--code", type=Path, required=True, help="checkout whose workflow/scripts/<stage>.py runs")
parser.add_argument("--data", type=Path, required=True, help="pipeline root holding config.yaml, resources/ and results/")
parser.add_argument("--family", required=True)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

config = yaml.safe_load((args.data / "config.yaml").read_text())
family = config["families"][args.family]
results = args.data / "results" / args.family
model_params = dict(kind=family["kind"], trust_remote_code=family.get("trust_remote_code", False),
                    include=config["layers"]["include"], exclude=config["layers"]["exclude"])
calibration = dict(model=str(args.data / "resources/models" / args.family), stats=str(results / "calib/stats.parquet"),
                   grams=str(results / "calib/grams.safetensors"))
args.out.mkdir(parents=True, exist_ok=True)
if args.stage == "evaluate":
    inputs = SimpleNamespace(
        **calibration, text=str(args.data / "resources/text/eval.txt"), packed=str(results / "packed"),
        fits=str(results / "fits"), sensitivity=str(results / "sensitivity.parquet"),
        sweep_plans=str(results / "sweep_plans.parquet"))
    outputs = SimpleNamespace(summary=str(args.out / "eval.parquet"), layers=str(args.out / "eval_layers.parquet"))
    params = SimpleNamespace(
        **model_params, quantization=config["quantization"], evaluate_budgets=config["sweep"]["evaluate"],
        budget_bpw=config["budget_bpw"], comparisons=config["comparisons"], evaluation=config["evaluation"])
else:
    inputs = SimpleNamespace(**calibration, text=str(args.data / "resources/text/calib.txt"))
    outputs = [str(args.out / "importance.parquet")]
    params = SimpleNamespace(**model_params, importance=config["importance"], seq_len=config["calibration"]["seq_len"],
                             seed=config["seed"])
snakemake = SimpleNamespace(input=inputs, output=outputs, params=params, log=[str(args.out / f"{args.stage}.log")],
                            threads=args.threads)
runpy.run_path(str(args.code / "workflow/scripts" / f"{args.stage}.py"), init_globals={"snakemake": snakemake})
