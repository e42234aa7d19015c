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
