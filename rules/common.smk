# Config validation and helpers shared by every rule.
import os
import sys

# The sopq and kernels packages come from this checkout, for Snakemake itself and for every job
# in whatever environment it runs (a venv, a rule's conda env, a SLURM node: jobs inherit this).
sys.path.insert(0, workflow.basedir)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))

from sopq.config import ConfigError, validate_config

try:
    validate_config(config)
except ConfigError as error:
    sys.exit(f"config error: {error}")

FAMILIES = list(config["families"])


wildcard_constraints:
    family="|".join(FAMILIES),


def family(key, default=None):
    """A per-family config value as a params function."""
    return lambda wildcards: config["families"][wildcards.family].get(key, default)


# Parameters that decide which layers exist and how the model is loaded: every rule that
# loads the model gets the same ones.
MODEL_PARAMS = {
    "kind": family("kind"),
    "trust_remote_code": family("trust_remote_code", False),
    "include": config["layers"]["include"],
    "exclude": config["layers"]["exclude"],
}


# The per-layer stage (sensitivity) runs as `shards` jobs per family (a per-family config key,
# default 1), each on a contiguous range of layers; a small local job merges the parts.
def n_shards(family_name):
    return config["families"][family_name].get("shards", 1)


def shard_parts(pattern):
    """Input function: the pattern for every shard of the wildcards' family."""
    return lambda wildcards: expand(pattern, family=wildcards.family, shard=range(n_shards(wildcards.family)))


def shard_param(wildcards):
    """(this shard, number of shards) for sopq.model.layer_shard."""
    return int(wildcards.shard), n_shards(wildcards.family)


wildcard_constraints:
    shard=r"\d+",


localrules:
    sensitivity,
