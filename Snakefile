# sopq: per-layer SOP quantization of transformer weights.
# Main job: snakemake --cores 8 results/report.html  (see README.md)

# The config file comes from profiles/default (config.yaml) unless --configfile names another:
# a second config file replaces the default rather than merging into it.

# `snakemake --report results/snakemake_report.zip` packs the outputs marked with report().
report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/fetch.smk"
include: "rules/calibrate.smk"
include: "rules/sensitivity.smk"
include: "rules/promote.smk"
include: "rules/fit.smk"
include: "rules/pack.smk"
include: "rules/kernel.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/export.smk"


rule all:
    default_target: True
    input:
        "results/report.html",
