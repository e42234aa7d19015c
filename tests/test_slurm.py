"""The slurm profile against a real one-node SLURM cluster (tests/slurm_cluster.py): the tiny test
config goes through `snakemake --profile profiles/slurm`, every job is an sbatch job, and the
results equal a local run's. Skipped, with the reason, where the daemons cannot be started."""
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slurm_cluster import ClusterUnavailable, OneNodeCluster
from test_workflow import REPO, planned_jobs, tiny_config, write_config

pytestmark = pytest.mark.workflow

# One family keeps the test small on a 2-core machine; every stage still runs as a SLURM job.
FAMILY = "tinyllama"
TARGETS = [f"results/{FAMILY}/{name}" for name in ("eval.parquet", "kernel.parquet")]
# Results compared with the local run (timings and logs differ by nature and are not compared).
TABLES = ["calib/stats.parquet", "importance.parquet", "sensitivity.parquet", "plan.parquet",
          "eval.parquet", "eval_layers.parquet"]
PACKED = "packed/model.safetensors"


def run_snakemake(workdir: Path, configfile: Path, *args: str, env=None) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), *args, *TARGETS]
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
def runs(cluster, tmp_path_factory):
    """(local workdir, slurm workdir, the slurm run's output)."""
    dirs = {}
    for where in ("local", "slurm"):
        work = tmp_path_factory.mktemp(where)
        config = tiny_config(work)
        config["families"] = {FAMILY: config["families"][FAMILY]}
        dirs[where] = (work, write_config(work / "test.yaml", config))

    run_snakemake(*dirs["local"], "--cores", "2")
    node_cpus = "2"
    output = run_snakemake(
        *dirs["slurm"],
        "--profile", str(REPO / "profiles" / "slurm"),
        "--jobs", "2",
        # The test cluster has no accounting database and no GPU.
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1",
        "--set-resources", "kernel:gpu=0",
        "--set-threads", *(f"{rule}={node_cpus}" for rule in ("calibrate", "importance", "sensitivity", "fit", "kernel", "evaluate")),
        env=cluster.env,
    )
    return dirs["local"][0], dirs["slurm"][0], output


def submitted_jobs(cluster) -> list[str]:
    """The rule of every job the cluster has seen (finished ones included: MinJobAge keeps them)."""
    result = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%k %T"],
                            capture_output=True, text=True, env=cluster.env, check=True)
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert all(state == "COMPLETED" for _, state in rows), result.stdout
    return [re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment)[1] for comment, _ in rows]


def test_every_job_went_through_sbatch(cluster, runs):
    _, work, output = runs
    stats = planned_jobs(output)
    jobs = submitted_jobs(cluster)
    assert sorted(jobs) == sorted(rule for rule, n in stats.items() for _ in range(n))
    # One SLURM log per job, kept where the profile puts them.
    assert len(list((work / "logs" / "slurm").rglob("*.log"))) == len(jobs)


def test_slurm_results_equal_local(runs):
    local, slurm, _ = runs
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(slurm / "results" / FAMILY / name),
                                      pd.read_parquet(local / "results" / FAMILY / name), obj=name)
    assert (slurm / "results" / FAMILY / PACKED).read_bytes() == (local / "results" / FAMILY / PACKED).read_bytes()
    kernel = [pd.read_parquet(w / "results" / FAMILY / "kernel.parquet") for w in (local, slurm)]
    assert kernel[0]["layer"].tolist() == kernel[1]["layer"].tolist()
    pd.testing.assert_series_equal(kernel[0]["rel_err"], kernel[1]["rel_err"])
