"""A throwaway one-node SLURM cluster (munged + slurmctld + slurmd) in a private directory.

No systemd, no accounting database: its own munge key and socket, its own slurm.conf, free TCP
ports. Clients find the slurm.conf through SLURM_CONF, except `srun` inside a job, which the
Snakemake jobstep plugin starts without SLURM_* variables: for it /etc/slurm/slurm.conf is a
symbolic link to ours while the cluster runs (only where no slurm.conf is there already: a
machine with a real SLURM set-up is left alone). Needs root and the Debian packages in
system-packages.txt. For trying the slurm profile by hand:

    python tests/slurm_cluster.py DIR     # starts it, prints `export SLURM_CONF=...`, Ctrl-C stops it
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


class ClusterUnavailable(RuntimeError):
    """The daemons cannot run here (not installed, not root, or they did not come up)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024  # leave the OS some room
    raise ClusterUnavailable("cannot read MemTotal from /proc/meminfo")


def _slurm_conf(root: Path, host: str) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=sopqtest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to squeue this long: the executor's squeue status check needs it.
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory={_node_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class OneNodeCluster:
    """Start with start(), stop with stop(); `env` holds SLURM_CONF for sbatch/squeue callers."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        self._linked_conf = False
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def start(self, timeout: float = 60) -> None:
        missing = [d for d in (*DAEMONS, "sbatch", "squeue", "sinfo") if shutil.which(d) is None
                   and not Path(f"/usr/sbin/{d}").exists()]
        if missing:
            raise ClusterUnavailable(f"not installed: {missing} (see system-packages.txt; `make system-packages` as root)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("the one-node cluster needs root (slurmd runs jobs as their user)")
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            raise ClusterUnavailable(f"{SYSTEM_CONF} exists: this machine has its own SLURM set-up, left alone")
        host = socket.gethostname().split(".")[0]
        (self.root / "slurm.conf").write_text(_slurm_conf(self.root, host))
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.root / "slurm.conf")
        self._linked_conf = True
        try:
            logs = self.root / "log"
            self._spawn("munged", [self._exe("munged"), "-F", "--force", f"--key-file={key}",
                                   f"--socket={self.root}/munge/munge.socket", f"--pid-file={self.root}/munge/munged.pid",
                                   f"--log-file={logs}/munged.log", f"--seed-file={self.root}/munge/seed"])
            self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), timeout, "munged")
            self._spawn("slurmctld", [self._exe("slurmctld"), "-D", "-i", "-f", str(self.root / "slurm.conf")])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld")
            self._spawn("slurmd", [self._exe("slurmd"), "-D", "-f", str(self.root / "slurm.conf"), "-N", host])
            self._wait(lambda: self._ok(["sinfo", "-h", "-o", "%T"], "idle"), timeout, "slurmd (node idle)")
        except BaseException:
            self.stop()  # never leave daemons or the /etc link behind
            raise

    def stop(self) -> None:
        """Stop the daemons this object started (only those, by pid), newest first."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self._linked_conf and SYSTEM_CONF.is_symlink():
            SYSTEM_CONF.unlink()
        self._linked_conf = False

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    @staticmethod
    def _exe(name: str) -> str:
        return shutil.which(name) or f"/usr/sbin/{name}"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)

    def _ok(self, cmd: list[str], expect: str) -> bool:
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        return result.returncode == 0 and expect in result.stdout

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                self.stop()
                raise ClusterUnavailable(f"{dead} exited while starting {what}:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise ClusterUnavailable(f"{what} did not come up within {timeout:.0f} s:\n{tail}")


if __name__ == "__main__":
    cluster = OneNodeCluster(Path(sys.argv[1]).resolve())
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        sys.exit(f"cannot start the cluster: {exc}")
    print(f"export SLURM_CONF={cluster.root / 'slurm.conf'}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
