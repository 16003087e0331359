"""A real Slurm cluster of several compute nodes on this one machine, for the multi-node tests.

Each compute node is a network namespace with its own address on a bridge (a veth pair each),
its own hostname (a UTS namespace) and its own slurmd; slurmctld and munged run on the host, which
holds the bridge's first address. The one filesystem stands in for the cluster's NFS share, so
the staging area, the run directories and the output are shared as on a real cluster.

What this layout needs (Slurm 22.05, OpenMPI 4.1), found by trying:
- slurmd enters the namespace with ``nsenter --net=/run/netns/NS``, not ``ip netns exec``: the
  latter remounts /sys, and slurmd then finds no cgroup tree.
- The namespaces get no default route: name look-ups that cannot leave them fail at once,
  where a route to nowhere makes each one hang 10-20 s.
- ``TmpFS=<root>/tmp/%n``: PMIx makes a folder per job step in TmpFS on every node; one shared
  /tmp would have the nodes trip over each other's folders.
- ``SlurmdSpoolDir``, ``SlurmdPidFile`` and ``SlurmdLogFile`` take ``%n`` for the same reason.
- Each slurmd also gets a time namespace whose boot time is the moment it starts (``unshare
  --time --boottime``): with power saving, slurmctld counts a node as resumed only when it
  registers with a boot time after the resume request; the machine's real uptime would make
  every resume fail at ResumeTimeout.
- Each node runs on one of the machine's cores in turn (``taskset``;
  ``SlurmdParameters=config_overrides`` keeps slurmd from draining it as smaller than slurm.conf
  says), so the ranks of a job on two nodes of a 2-core machine do not fight over one core.

A node can be lost (its link cut, then every process in its namespace killed: a machine that
goes silent), brought back, or, with power saving, started and stopped by slurmctld itself
through ResumeProgram and SuspendProgram (tests/slurm_power.py), as CycleCloud's autoscaler does.

Names carry this process's id and a number per cluster (``mst<pid>x<k>...``) and each cluster
takes a 10.213.<k>.0/24 no link here holds yet, so two clusters (of one test run or two) never
meet; stop() removes only what its cluster made, and start() what a killed earlier run left.

For a look by hand (root): ``python tests/slurm_nodes.py /tmp/cluster`` starts four nodes and
prints the SLURM_CONF to export; Ctrl-C (or SIGTERM) stops them.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TypedDict

from slurm_cluster import SlurmCluster, SlurmUnavailable, _program

PREFIX = "mst"
POWER_SCRIPT = Path(__file__).with_name("slurm_power.py")
_NUMBERS = itertools.count(1)  # this process's clusters


class NodeFacts(TypedDict):
    namespace: str
    link: str  # the host's end of its veth pair
    cpus: list[int]


class PowerDescription(TypedDict):
    """<cluster>/power.json: what starts a node, for this module and the power programs."""

    conf: str
    slurmd: str
    root: str
    nodes: dict[str, NodeFacts]
    fail_resume: list[str]  # nodes the resume program leaves down (a VM that never boots)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SlurmUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in _ip("netns", "pids", namespace, check=False).stdout.split()]


def kill_namespace(namespace: str) -> None:
    """Kill every process in the namespace at once (SIGKILL), as a machine that loses power."""
    for _ in range(50):
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"processes of namespace {namespace} outlived SIGKILL for 5 s: {namespace_pids(namespace)}")


def remove_leftovers() -> None:
    """Namespaces and bridges of earlier test runs whose process is gone (a run killed hard)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = re.fullmatch(rf"{PREFIX}(\d+)x\d+-n\d+", name)
        if found and not _alive(int(found.group(1))):
            kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        found = re.search(rf"\d+: ({PREFIX}(\d+)x\d+(?:br|n\d+h))[:@]", line)
        if found and not _alive(int(found.group(2))):
            _ip("link", "del", found.group(1), check=False)


class SlurmNodes(SlurmCluster):
    """slurmctld on the host and ``count`` compute nodes n1..nN, each in its own namespace.

    ``power_saving``: slurm.conf lines (SuspendTime=..., ResumeTimeout=..., ...) that turn on
    Slurm's power saving: the nodes then start powered down (State=CLOUD) and slurmctld starts
    and stops them itself through tests/slurm_power.py.
    """

    def __init__(self, root: Path, count: int = 3, cpus: int = 2, power_saving: list[str] | None = None) -> None:
        super().__init__(root)
        self.count = count
        self.cpus = cpus
        self.power_saving = power_saving or []
        self.tag = f"{PREFIX}{os.getpid()}x{next(_NUMBERS)}"  # at most 15 characters with a node's
        self.bridge = f"{self.tag}br"
        self.subnet = ""  # 10.213.<k>, chosen by start()
        self.names = [f"n{index}" for index in range(1, count + 1)]
        self._nodes: dict[str, subprocess.Popen[bytes]] = {}
        self._made: list[tuple[str, ...]] = []  # `ip ... del` commands that undo what start() made

    def namespace(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def link(self, node: str) -> str:
        return f"{self.tag}{node}h"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{10 + self.names.index(node) + 1}"

    @property
    def controller_address(self) -> str:
        return f"{self.subnet}.1"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("network namespaces need root")
        for program in ("ip", "nsenter", "unshare", "taskset"):
            _program(program)  # SlurmUnavailable saying what to install
        remove_leftovers()
        # A start that fails leaves its cleanup to stop(), as for every test service (conftest.served).
        self._make_network()
        for node in self.names:  # the %n folders: Slurm makes none of them itself
            for folder in ("tmp", "spool"):
                (self.root / folder / node).mkdir(parents=True, exist_ok=True)
        # Before slurmctld starts: it turns power saving off if the programs are missing.
        self._write_power_description()
        super().start(timeout)

    def _make_network(self) -> None:
        taken = set(re.findall(r"inet 10\.213\.(\d+)\.", _ip("-o", "addr", "show").stdout))
        free = [k for k in range(1, 255) if str(k) not in taken]
        if not free:
            raise SlurmUnavailable("every 10.213.<k>.0/24 is in use on this machine")
        self.subnet = f"10.213.{free[0]}"
        self._make(("link", "add", self.bridge, "type", "bridge"), ("link", "del", self.bridge))
        _ip("addr", "add", f"{self.controller_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.names:
            namespace, host_end, node_end = self.namespace(node), self.link(node), f"{self.tag}{node}n"
            self._make(("netns", "add", namespace), ("netns", "del", namespace))
            # Deleting the host's end deletes its peer, wherever that is.
            self._make(("link", "add", host_end, "type", "veth", "peer", "name", node_end), ("link", "del", host_end))
            _ip("link", "set", host_end, "master", self.bridge, "up")
            _ip("link", "set", node_end, "netns", namespace)
            _ip("-n", namespace, "link", "set", node_end, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def _make(self, command: tuple[str, ...], undo: tuple[str, ...]) -> None:
        _ip(*command)
        self._made.append(undo)

    def _write_power_description(self) -> None:
        """What tests/slurm_power.py needs to start or stop a node when slurmctld asks."""
        description: PowerDescription = {
            "conf": str(self.conf),
            "slurmd": _program("slurmd"),
            "root": str(self.root),
            "nodes": {
                node: {"namespace": self.namespace(node), "link": self.link(node), "cpus": self.node_cpus(node)}
                for node in self.names
            },
            "fail_resume": [],
        }
        (self.root / "power.json").write_text(json.dumps(description, indent=1))
        # slurmctld runs ResumeProgram and the others with the node list as their one argument.
        for action in ("resume", "suspend", "resume_fail"):
            program = self.root / f"{action}.sh"
            program.write_text(
                f'#!/bin/sh\nexec "{sys.executable}" "{POWER_SCRIPT}" {action} "{self.root / "power.json"}" "$@"\n'
            )
            program.chmod(0o755)

    def stop(self) -> None:
        # slurmctld first: once it is gone, no resume program starts a node behind our back.
        super().stop()
        for node in self.names:
            if self.namespace(node) in [undo[-1] for undo in self._made]:
                kill_namespace(self.namespace(node))
        for daemon in self._nodes.values():
            daemon.wait(timeout=10)
        self._nodes.clear()
        for undo in reversed(self._made):
            _ip(*undo, check=False)
        self._made.clear()

    # -- slurm.conf --------------------------------------------------------------------------

    def settings(self) -> list[str]:
        per_node = {
            "SlurmdSpoolDir": self.root / "spool" / "%n",
            "SlurmdPidFile": self.root / "%n.pid",
            "SlurmdLogFile": self.root / "log" / "slurmd-%n.log",
        }
        lines = [line for line in super().settings() if line.split("=")[0] not in {*per_node, "KillWait", "AuthInfo"}]
        lines += [f"{key}={value}" for key, value in per_node.items()]
        lines += [
            f"TmpFS={self.root / 'tmp' / '%n'}",
            # A node whose slurmd stops answering is DOWN after this many seconds, and its
            # jobs are requeued (NODE_FAIL); the default, 300 s, is long for a test.
            "SlurmdTimeout=5",
            "MessageTimeout=5",
            # The ranks that survive a lost node wait in MPI for the lost ones, where no signal
            # reaches them: Slurm kills them this long after its SIGTERM (default 30 s).
            "KillWait=5",
            # A requeued job may start again this long after it ended (default 120 s).
            "AuthInfo=cred_expire=5",
            # Requeue batch jobs whose node fails (Slurm's default too, said here).
            "JobRequeue=1",
            # The nodes say CPUs=2 while each runs on one of this machine's cores: slurmd takes
            # slurm.conf's word for it instead of draining the node as smaller than configured.
            "SlurmdParameters=config_overrides",
        ]
        if self.power_saving:
            lines += [
                f"ResumeProgram={self.root / 'resume.sh'}",
                f"SuspendProgram={self.root / 'suspend.sh'}",
                f"ResumeFailProgram={self.root / 'resume_fail.sh'}",
                # The rest as given (the CycleCloud template's), less the programs: these are ours.
                *(line for line in self.power_saving if not line.split("=")[0].endswith("Program")),
            ]
        return lines

    def layout(self) -> list[str]:
        state = "CLOUD" if self.power_saving else "UNKNOWN"
        nodes = [
            f"NodeName={node} NodeHostname={node} NodeAddr={self.address(node)} CPUs={self.cpus} "
            f"RealMemory=2000 State={state}"
            for node in self.names
        ]
        return [*nodes, f"PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP"]

    def daemons(self) -> list[list[str]]:
        return [[self.programs["slurmctld"], "-D"]]

    def start_nodes(self) -> None:
        if not self.power_saving:
            for node in self.names:
                self.start_node(node)

    def ready(self) -> bool:
        for node, daemon in self._nodes.items():
            if daemon.poll() is not None:
                raise SlurmUnavailable(f"slurmd of {node} exited: {self._log_tail()}")
        if self.power_saving:
            # Powered down until a job asks for them: ready once slurmctld answers.
            return self.run("sinfo", "-h", "-o", "%T", check=False).returncode == 0
        states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return len(states) == self.count and set(states) == {"idle"}

    # -- nodes -------------------------------------------------------------------------------

    def node_cpus(self, node: str) -> list[int]:
        """The machine's CPUs this node runs on: one each, in turn, as if each node had its own
        core (a job's ranks on two nodes then do not share one, as on a real cluster)."""
        cpus = sorted(os.sched_getaffinity(0))
        return [cpus[self.names.index(node) % len(cpus)]]

    def start_node(self, node: str) -> None:
        """Start the node's slurmd in its namespace (after a loss, ReturnToService=2 lets it back)."""
        _ip("link", "set", self.link(node), "up")
        self._nodes[node] = launch_slurmd(json.loads((self.root / "power.json").read_text()), node, self.env())

    def kill_node(self, node: str) -> None:
        """The node dies: its link goes silent (no connection is closed, as when a machine loses
        power), then its slurmd, the job steps and every rank on it are killed."""
        _ip("link", "set", self.link(node), "down")
        kill_namespace(self.namespace(node))
        daemon = self._nodes.pop(node, None)
        if daemon is not None:
            daemon.wait(timeout=10)

    def heal(self, timeout: float = 60) -> None:
        """Back to every node idle, for the next test: no job left, lost nodes started again."""
        self.run("scancel", "--full", "--partition=debug", check=False)
        for node in self.names:
            if not self.processes_on(node):
                self.start_node(node)
        deadline = time.monotonic() + timeout
        while True:
            shown = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = dict(line.split() for line in shown.stdout.splitlines() if line.strip())
            if shown.returncode == 0 and len(states) == self.count and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle again after {timeout:.0f} s: {states or shown.stderr.strip()}")
            time.sleep(0.5)

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-n", node, "-N", "-o", "%T", check=False).stdout.strip()

    def wait_node(self, node: str, states: set[str], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.node_state(node)
            if state in states:
                return state
            time.sleep(0.3)
        raise TimeoutError(f"node {node} still {self.node_state(node)!r} after {timeout:.0f} s, not one of {states}")

    def processes_on(self, node: str) -> list[int]:
        return namespace_pids(self.namespace(node))

    def busy(self, node: str) -> bool:
        """Whether anything besides slurmd runs on the node (a job's steps, ranks, script)."""
        for pid in self.processes_on(node):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "slurmd":
                    return True
            except OSError:
                continue
        return False

    def fail_resume(self, *nodes: str) -> None:
        """Make the power program refuse to start these nodes (a VM that never boots)."""
        path = self.root / "power.json"
        description = json.loads(path.read_text())
        description["fail_resume"] = list(nodes)
        path.write_text(json.dumps(description, indent=1))


def launch_slurmd(
    description: PowerDescription, node: str, env: dict[str, str], detach: bool = False
) -> subprocess.Popen[bytes]:
    """slurmd as node ``node``: in its network namespace, under its own hostname, on its CPUs.
    ``description``: the cluster's power.json. ``detach``: in a session of its own, to outlive
    the caller (the power program that slurmctld runs and waits for)."""
    facts = description["nodes"][node]
    uptime = int(float(Path("/proc/uptime").read_text().split()[0]))
    command = [
        "taskset", "-c", ",".join(map(str, facts["cpus"])),
        "nsenter", f"--net=/run/netns/{facts['namespace']}", "--",
        # Booted just now: slurmctld takes a resumed node that registers with a boot time before
        # the resume request for one that never rebooted, and waits on until ResumeTimeout.
        "unshare", "--uts", "--time", "--boottime", str(-uptime), "--",
        "sh", "-c", 'hostname "$0" && exec "$1" -D -N "$0" -f "$2"', node, description["slurmd"], description["conf"],
    ]
    log = Path(description["root"]) / "log" / f"daemons-{node}.out"
    with log.open("ab") as output:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=detach
        )


def _stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # For developers: python tests/slurm_nodes.py /tmp/cluster — four nodes until Ctrl-C or SIGTERM.
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _stop_on_signal)
    cluster = SlurmNodes(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mpistyle-nodes"), count=4)
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}  # nodes: {', '.join(cluster.names)}; Ctrl-C stops them", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
