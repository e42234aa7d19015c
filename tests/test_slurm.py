"""The slurm profile against a real one-node SLURM cluster (tests/slurm_cluster.py): the tiny test
config goes through `snakemake --profile profiles/slurm`, every job is an sbatch job, and the
results equal a local run's. Skipped, with the reason, where the daemons cannot be started."""
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from slurm_cluster import ClusterUnavailable, OneNodeCluster
from test_workflow import REPO, planned_jobs, write_config

pytestmark = pytest.mark.workflow

# One family keeps the test small on a 2-core machine; every stage still runs as a SLURM job.
FAMILY = "tinyllama"
TARGETS = [f"results/{FAMILY}/{name}" for name in ("eval.parquet", "kernel.parquet")]
# Results compared with the local run (timings and logs differ by nature and are not compared).
TABLES = ["calib/stats.parquet", "importance.parquet", "sensitivity.parquet", "plan.parquet",
          "eval.parquet", "eval_layers.parquet"]
PACKED = "packed/model.safetensors"
# The shard merges: local rules, run by the submitting Snakemake.
LOCAL_RULES = ("sensitivity",)
# Rules whose threads the slurm profile sets: the test node has 2 CPUs.
THREADED_RULES = ("calibrate", "importance", "sensitivity_shard", "kernel", "evaluate")


def run_snakemake(workdir: Path, configfile: Path, *args: str, env=None) -> str:
    # Targets first: several options take any number of values.
    cmd = [sys.executable, "-m", "snakemake", *TARGETS, "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-10000:]
    return output


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = OneNodeCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no one-node SLURM cluster here: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def runs(tiny_workflow, cluster, tmp_path_factory):
    """(local workdir, slurm workdir, the slurm run's output). The local run is the session's
    tiny workflow run; the slurm run takes one of its families, with the per-layer stages split
    in two shards."""
    local, config, local_configfile = tiny_workflow
    # Whatever a test before this one removed from the local run comes back (a no-op otherwise).
    run_snakemake(local, local_configfile, "--cores", "2")
    work = tmp_path_factory.mktemp("slurm")
    config = {**config, "families": {FAMILY: {**config["families"][FAMILY], "shards": 2}}}
    node_cpus = "2"
    output = run_snakemake(
        work, write_config(work / "test.yaml", config),
        "--profile", str(REPO / "profiles" / "slurm"),
        "--jobs", "2", "--cores", node_cpus, "--max-threads", node_cpus,
        # The test cluster has no accounting database and no GPU.
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1",
        "--set-resources", "kernel:gpu=0",
        "--set-threads", *(f"{rule}={node_cpus}" for rule in THREADED_RULES),
        env=cluster.env,
    )
    return local, work, output


def sbatch_states(cluster) -> list[str]:
    """The state of every job the cluster has seen (finished ones included: MinJobAge keeps them)."""
    result = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%T"],
                            capture_output=True, text=True, env=cluster.env, check=True)
    return result.stdout.split()


def test_every_job_went_through_sbatch(cluster, runs):
    _, work, output = runs
    planned = planned_jobs(output)
    # The SLURM log of each sbatch job (the profile keeps them) shows the jobs it ran: the
    # Snakemake inside each job step prints `localrule NAME:` as it runs one.
    logs = sorted((work / "logs" / "slurm").rglob("*.log"))
    states = sbatch_states(cluster)
    assert len(states) == len(logs) and set(states) == {"COMPLETED"}, states
    ran = Counter(rule for log in logs for rule in re.findall(r"^localrule (\w+):$", log.read_text(), re.M))
    assert ran == Counter({rule: n for rule, n in planned.items() if rule not in LOCAL_RULES})
    assert all(planned[rule] == 1 for rule in LOCAL_RULES)  # the shard merges ran on the submitting node
    # The two sensitivity shards went to the cluster as one group job.
    assert len(logs) == sum(ran.values()) - 1
    groups = {log.parent.name for log in logs if log.parent.name.startswith("group_")}
    assert {g.split("_shards")[0] for g in groups} == {"group_sensitivity"}, groups


def test_slurm_results_equal_local(runs):
    local, slurm, _ = runs
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(slurm / "results" / FAMILY / name),
                                      pd.read_parquet(local / "results" / FAMILY / name), obj=name)
    assert (slurm / "results" / FAMILY / PACKED).read_bytes() == (local / "results" / FAMILY / PACKED).read_bytes()
    kernel = [pd.read_parquet(w / "results" / FAMILY / "kernel.parquet") for w in (local, slurm)]
    assert kernel[0]["layer"].tolist() == kernel[1]["layer"].tolist()
    pd.testing.assert_series_equal(kernel[0]["rel_err"], kernel[1]["rel_err"])
