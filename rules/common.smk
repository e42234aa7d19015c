# Config validation and helpers shared by every rule.
import os
import sys

from sopq.config import ConfigError, validate_config

# Jobs import the sopq and kernels packages from this checkout, in whatever environment they
# run (a venv, a rule's conda env, a SLURM node): sbatch and script jobs inherit this.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))

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
