"""A real one-node Slurm for tests: slurmctld + slurmd from Debian's slurm-wlm, configured
without munge or cgroups (auth/none, cred/none, proctrack/linuxproc, task/none), all state and
spool under a temporary folder, stopped by PID.

    with SlurmCluster(tmp_path) as slurm:
        job = slurm.sbatch(["slurm/stage3.sbatch"], env=...)
        slurm.wait(job)

Slurm itself is installed by `scripts/install-slurm.sh` (which `scripts/test.sh` runs);
`slurm_missing()` says what is absent, for a skip message.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from ..distributed import free_port

DAEMONS = ("slurmctld", "slurmd")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}


def _missing() -> list[str]:
    return [d for d in (*DAEMONS, "sbatch", "scontrol", "squeue") if shutil.which(d) is None
            and not Path("/usr/sbin", d).exists()]


def slurm_missing() -> Optional[str]:
    """None when Slurm is installed; else what is missing and how to install it."""
    missing = _missing()
    if not missing:
        return None
    return f"Slurm ({', '.join(missing)}) is not installed: run `bash scripts/install-slurm.sh` (scripts/test.sh does)"


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: str | Path, cpus: Optional[int] = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=qmmtest", f"SlurmctldHost={self.host}(127.0.0.1)",
            "AuthType=auth/none", "CredType=cred/none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SlurmUser=root", "SlurmdUser=root", "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "KillWait=60", "MinJobAge=3600", "InactiveLimit=0", "SlurmdTimeout=60",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]) + "\n")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.write_config()
        self.procs["slurmctld"] = subprocess.Popen([_exe("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)],
                                                   env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.procs["slurmd"] = subprocess.Popen([_exe("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)],
                                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.log(name)[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"the Slurm node did not become idle in {timeout} s: {self.log('slurmctld')[-2000:]}")

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            p = self.procs.pop(name, None)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, cmd: list[str], check: bool = True, env: Optional[dict] = None, cwd=None):
        return subprocess.run([_exe(cmd[0]), *cmd[1:]], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd=None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def state(self, job: int) -> tuple[str, str]:
        """(state, exit code) from scontrol, e.g. ("COMPLETED", "0:0")."""
        out = self.run(["scontrol", "show", "job", "-o", str(job)]).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields.get("JobState", "?"), fields.get("ExitCode", "?")

    def wait(self, job: int, timeout: float = 600, until=FINISHED) -> tuple[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job)
            if state[0] in until:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout} s")
