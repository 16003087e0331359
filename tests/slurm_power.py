"""The test cluster's ResumeProgram, SuspendProgram and ResumeFailProgram (tests/slurm_nodes.py):
what CycleCloud's autoscaler does with VMs, done with the nodes' network namespaces.

    slurm_power.py resume|suspend|resume_fail <cluster>/power.json <Slurm host list>

- resume: start each node's slurmd (a VM booting and joining) after 2 s (a boot takes a while,
  and slurmctld counts a node as rebooted only if its boot time, in whole seconds, is after the
  resume request), and return without waiting for it: slurmctld waits up to ResumeTimeout for
  the node to register. A node listed in power.json's ``fail_resume`` is not started (a VM that
  never boots).
- suspend: kill every process in the node's namespace (a VM deallocated).
- resume_fail: what CycleCloud does with a node that did not come up in time: deallocate it
  too, so that a later resume starts it afresh.

Every call is logged to <cluster>/log/power.log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from slurm_nodes import PowerDescription, kill_namespace, launch_slurmd


def main(action: str, description_path: str, hostlist: str) -> int:
    description: PowerDescription = json.loads(Path(description_path).read_text())
    env = {**os.environ, "SLURM_CONF": description["conf"]}
    expanded = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, env=env)
    nodes = expanded.stdout.split() if expanded.returncode == 0 else []
    with (Path(description["root"]) / "log" / "power.log").open("a") as log:
        print(f"{time.strftime('%H:%M:%S')} {action} {hostlist} -> {' '.join(nodes) or expanded.stderr.strip()}", file=log)
        for node in nodes:
            if node not in description["nodes"]:
                print(f"  {node}: not a node of this cluster", file=log)
            elif action == "resume" and node in description["fail_resume"]:
                print(f"  {node}: left down (fail_resume)", file=log)
            elif action == "resume":
                time.sleep(2)
                subprocess.run(["ip", "link", "set", description["nodes"][node]["link"], "up"], check=False)
                launch_slurmd(description, node, env, detach=True)
            else:
                kill_namespace(description["nodes"][node]["namespace"])
    return 0 if nodes else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
