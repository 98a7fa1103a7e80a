"""A real two-node SLURM (Debian's slurm-wlm + munge) on one host, inside a network namespace.

Neither slurmd/slurmctld nor Ray can be told to listen on loopback only, so everything (munged,
slurmctld, two slurmd, and the Ray processes jobs start) runs in a namespace with nothing but `lo`.
Daemons are stopped by their own process ids; anything left in the namespace is killed with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "ip")


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [b for b in BINARIES if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"missing {missing}: apt-get install slurm-wlm munge (as .ci/run does)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2, gpus: int = 0):
        self.root, self.nodes, self.cpus, self.gpus = root, nodes, cpus, gpus
        self.ns = f"alia-slurm-{os.getpid()}"
        self.conf = root / "slurm.conf"
        self.pids: list[int] = []

    # --------------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SLURM_CONF=str(self.conf), **extra)
        return env

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace with this cluster's SLURM_CONF."""
        kw.setdefault("env", self.env())
        return subprocess.run([*self.prefix, *args], **kw)

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("env", self.env())
        return subprocess.Popen([*self.prefix, *args], **kw)

    @property
    def prefix(self) -> list[str]:
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup tree slurmd reads.
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def sbatch(self, args: list[str], env: dict[str, str], timeout: float) -> int:
        """Submit a batch job and wait for it: its exit code. Like `sbatch --wait`, whose polling interval
        grows to tens of seconds (a 3 s job took 10 s here, a 45 s one 74 s); this polls every 0.5 s."""
        job = self.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, check=True)
        job_id = job.stdout.strip().split(";")[0]
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
            state = re.search(r"\bJobState=(\w+)", info)
            if state and state[1] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                code = re.search(r" ExitCode=(\d+):(\d+)", info)
                assert code, info
                status, signal_number = int(code[1]), int(code[2])
                return status or (128 + signal_number if signal_number else 0)
            time.sleep(0.5)
        self.run(["scancel", job_id])
        raise TimeoutError(f"job {job_id} still running after {timeout} s")

    # --------------------------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"], check=True)
        # Slurm's resolver needs a second loopback address inside a namespace (FACTS.md section 5).
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], check=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.sock"
        self.run(["munged", f"--socket={sock}", f"--key-file={key}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                  f"--log-file={r / 'munge' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}", "--force"],
                 check=True)  # fmt: skip
        ctl, *node_ports = _free_ports(1 + self.nodes)
        names = f"n[1-{self.nodes}]"
        gres_conf, node_gres = [], ""
        if self.gpus:
            # Fake GPUs: slurmd wants GRES files to be device nodes; these are copies of /dev/null (1, 3).
            (r / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus):
                os.mknod(r / "dev" / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            (r / "gres.conf").write_text(f"NodeName={names} Name=gpu File={r / 'dev'}/nvidia[0-{self.gpus - 1}]\n")
            gres_conf, node_gres = ["GresTypes=gpu"], f" Gres=gpu:{self.gpus}"
        self.conf.write_text(
            "\n".join([
                "ClusterName=aliatest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctl}",
                "SlurmUser=root", "SlurmdUser=root", f"AuthInfo=socket={sock}", "CredType=cred/munge",
                f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
                f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'spool'}/%n.pid",
                f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log'}/%n.log",
                "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "SlurmdTimeout=30",
                "KillWait=5", "InactiveLimit=0", "MinJobAge=60", *gres_conf,
                f"NodeName={names} NodeHostname=localhost NodeAddr=127.0.0.1 "
                f"Port=[{node_ports[0]}-{node_ports[0] + self.nodes - 1}] CPUs={self.cpus} RealMemory=1000{node_gres}",
                f"PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP",
            ]) + "\n"
        )  # fmt: skip
        self.run(["slurmctld", "-f", str(self.conf)], check=True)
        for i in range(1, self.nodes + 1):
            (r / "spool" / f"n{i}").mkdir(exist_ok=True)
            self.run(["slurmd", "-f", str(self.conf), "-N", f"n{i}"], check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True).stdout
            if out.strip() == f"idle {self.nodes}":
                return self
            time.sleep(1)
        raise RuntimeError(f"SLURM nodes not idle after 60 s: {out!r}; see {r / 'log'}")

    def stop(self) -> None:
        r = self.root
        self.run(["scancel", "--user=root"], capture_output=True)
        pidfiles = [*sorted((r / "spool").glob("*.pid")), r / "slurmctld.pid", r / "munge" / "munged.pid"]
        for pidfile in pidfiles:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        time.sleep(2)
        # Whatever jobs left behind in the namespace (Ray, steps) goes with it.
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
