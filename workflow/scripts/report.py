"""Snakemake script of rule `report`: the self-contained cross-family HTML report.

The rule provides (every per-family list in the order of params.families):
    input.sensitivity   results/{family}/sensitivity.parquet
    input.plan          results/{family}/plan.parquet
    input.kernel        results/{family}/kernel.parquet
    input.eval          results/{family}/eval.parquet
    input.eval_layers   results/{family}/eval_layers.parquet
    input.pareto        results/{family}/pareto.parquet (optional)
    input.benchmarks    benchmark TSV files, any order: benchmarks/{family}/{rule}.tsv and
                        benchmarks/{rule}.tsv for family-free rules (may be empty)
    params.families     list of family names
    params.config       the whole config dict; config["families"][name] has "kind" and
                        "source_precision"
    output[0]           results/report.html
    log[0]              the log file

The rule is in rules/report.smk.
"""
from pathlib import Path

from sopq.logs import rule_log
from sopq.report import build_report

TABLES = ("sensitivity", "plan", "kernel", "eval", "eval_layers")
OPTIONAL_TABLES = ("pareto",)  # the budget sweep; the report leaves out the alpha check without it


def as_list(files) -> list[str]:
    # a named input given one plain string comes back as that string, not a list
    return [files] if isinstance(files, str) else list(files)


def main(smk) -> None:
    names = list(smk.params.families)
    config = smk.params.config
    tables = {table: as_list(getattr(smk.input, table)) for table in TABLES}
    tables.update({table: as_list(getattr(smk.input, table)) for table in OPTIONAL_TABLES if hasattr(smk.input, table)})
    for table, files in tables.items():
        if len(files) != len(names):
            raise ValueError(
                f"input.{table} has {len(files)} files for {len(names)} families {names}; "
                "give one per family, in the order of params.families"
            )
    families = {}
    for i, name in enumerate(names):
        spec = config.get("families", {}).get(name)
        if spec is None or "kind" not in spec or "source_precision" not in spec:
            raise ValueError(f"config['families'][{name!r}] needs 'kind' and 'source_precision' for the report")
        families[name] = {
            "kind": spec["kind"],
            "source_precision": spec["source_precision"],
            **{table: Path(files[i]) for table, files in tables.items()},
        }
    benchmarks = [Path(p) for p in as_list(getattr(smk.input, "benchmarks", []))]
    build_report(families, config, benchmarks, Path(smk.output[0]))


with rule_log(snakemake.log[0]):  # noqa: F821 (snakemake is injected by Snakemake)
    main(snakemake)  # noqa: F821
