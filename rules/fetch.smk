rule fetch_model:
    output:
        directory("resources/models/{family}"),
    params:
        source=family("source"),
        kind=family("kind"),
        trust_remote_code=family("trust_remote_code", False),
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/{family}/fetch_model.log",
    benchmark:
        "benchmarks/{family}/fetch_model.tsv"
    resources:
        mem_mb=2000,
    script:
        "../workflow/scripts/fetch_model.py"


rule fetch_text:
    output:
        calib="resources/text/calib.txt",
        eval="resources/text/eval.txt",
    params:
        text=config["text"],
    conda:
        "../envs/sopq.yaml"
    log:
        "logs/fetch_text.log",
    benchmark:
        "benchmarks/fetch_text.tsv"
    script:
        "../workflow/scripts/fetch_text.py"
