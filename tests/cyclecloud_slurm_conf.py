"""The Slurm configuration a cluster started from our CycleCloud template gets, rendered offline.

The cyclecloud/slurm cluster-init that the template pins (Azure/cyclecloud-slurm 4.0.0) writes
slurm.conf on the scheduler from the node's configuration (``jetpack config``); ``azslurm
partitions`` then writes the nodes and partitions into azure.conf, which slurm.conf includes. This
module redoes both from the template, so that the tests can check what the template sets against
what the installer reads, parse the result with the local Slurm, and hand the power-saving and
node-failure settings to anyone who wants a test cluster that behaves like the CycleCloud one:
power_saving_settings(template) and node_failure_settings(template), Slurm key -> value.

Written from reading (not copying) Azure/cyclecloud-slurm at tag 4.0.0 (commit 09c8a64):
  azure-slurm-install/install.py            InstallSettings (what it reads, which defaults),
                                            _complete_install_primary (slurm.conf, keep_alive.conf),
                                            _accounting_primary (accounting.conf)
  azure-slurm-install/templates/slurm.conf.template   the settings and where the values go
  azure-slurm/slurmcc/cli.py _partitions,   the PartitionName and Nodename lines of azure.conf
  azure-slurm/slurmcc/partition.py          (node names, memory, CPUs, which nodearrays count)
4.0.1 and 4.0.2 add ReconfigFlags=KeepPowerSaveSettings and three HealthCheck* lines; they are
not rendered here, because the template pins 4.0.0.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyclecloud_template import Section, Template, load

# What 4.0.0's slurm.conf sets, in its order, with the installer's values in {braces}. The
# installer fills them with str.format from the scheduler's configuration (see render_slurm_conf).
SLURM_CONF_SETTINGS: tuple[tuple[str, str], ...] = (
    ("MpiDefault", "none"),
    ("ProctrackType", "proctrack/cgroup"),
    ("ReturnToService", "2"),
    ("PropagateResourceLimits", "ALL"),
    ("SlurmctldPidFile", "/var/run/slurmctld.pid"),
    ("SlurmdPidFile", "/var/run/slurmd.pid"),
    ("SlurmdSpoolDir", "/var/spool/slurmd"),
    ("SlurmUser", "slurm"),
    ("StateSaveLocation", "{state_save_location}"),
    ("SwitchType", "switch/none"),
    ("TaskPlugin", "task/affinity,task/cgroup"),
    ("SchedulerType", "sched/backfill"),
    ("SelectType", "select/cons_tres"),
    ("GresTypes", "gpu"),
    ("SelectTypeParameters", "CR_Core_Memory"),
    ("ClusterName", "{cluster_name}"),
    ("JobAcctGatherType", "jobacct_gather/none"),
    ("SlurmctldDebug", "debug"),
    ("SlurmctldLogFile", "/var/log/slurmctld/slurmctld.log"),
    ("SlurmctldParameters", "idle_on_node_suspend"),
    ("SlurmdDebug", "debug"),
    ("SlurmdLogFile", "/var/log/slurmd/slurmd.log"),
    ("DisableRootJobs", "No"),
    # Straight from slurm.launch_parameters, default "": an empty value is a parse error.
    ("LaunchParameters", "{launch_parameters}"),
    ("PrivateData", "cloud"),
    ("PrologSlurmctld", "/opt/azurehpc/slurm/prolog.sh"),
    ("Prolog", "{prolog}"),
    ("Epilog", "{epilog}"),
    ("PrologFlags", "alloc"),
    ("TreeWidth", "65533"),
    ("ResumeTimeout", "1800"),
    ("SuspendTimeout", "600"),
    ("SuspendTime", "300"),
    ("ResumeProgram", "/opt/azurehpc/slurm/resume_program.sh"),
    ("ResumeFailProgram", "/opt/azurehpc/slurm/resume_fail_program.sh"),
    ("SuspendProgram", "/opt/azurehpc/slurm/suspend_program.sh"),
    ("SchedulerParameters", "max_switch_wait=24:00:00"),
    ("MaxNodeCount", "{max_node_count}"),
)
# Files slurm.conf includes, relative to its folder, all written by the installer or azslurm.
INCLUDES = ("azure.conf", "accounting.conf", "keep_alive.conf")
# The settings of slurm.conf that make Slurm start and stop cloud nodes: power_saving_settings().
POWER_SAVING_KEYS = ("SuspendTime", "SuspendTimeout", "ResumeTimeout", "SuspendProgram", "ResumeProgram",
                     "ResumeFailProgram", "SlurmctldParameters", "SuspendExcNodes", "SuspendExcParts", "SuspendExcStates")
# The settings that decide what happens to a node that stops answering: node_failure_settings().
# The installer sets only ReturnToService; SlurmdTimeout is then Slurm's default, 300 s.
NODE_FAILURE_KEYS = ("ReturnToService", "SlurmdTimeout", "JobRequeue")

SCHEDULER = "scheduler"


class InstallerError(RuntimeError):
    """The pinned installer would stop here (a KeyError in install.py) before writing slurm.conf."""


@dataclass(frozen=True)
class MachineShape:
    """What CycleCloud knows of a VM size and azslurm puts on its Nodename line."""

    vcpus: int
    cores: int
    memory_gib: float
    gpus: int


# The template's default sizes, as Azure publishes them (vCPUs, cores, GiB, GPUs).
SHAPES = {
    "Standard_NC4as_T4_v3": MachineShape(vcpus=4, cores=2, memory_gib=28, gpus=1),
    "Standard_F8s_v2": MachineShape(vcpus=8, cores=4, memory_gib=16, gpus=0),
}


# --- the template, resolved as CycleCloud would for one node -----------------------------------


def literal(text: str) -> Any:
    """A template value as jetpack hands it on: CycleCloud types unquoted true/false and whole
    numbers; everything else is a string."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def parameter_values(template: Template, params: dict[str, Any] | None = None) -> dict[str, str]:
    """Each parameter's value as template text: its DefaultValue, or what ``params`` (a
    params.json: JSON values) gives it."""
    values = {s.name: s.get("DefaultValue") or "" for s in template.walk() if s.kind == "parameter"}
    for name, value in (params or {}).items():
        values[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return values


def _resolve(value: str, values: dict[str, str], where: str) -> Any:
    if "${" in value:
        raise ValueError(f"{where} = {value}: an expression; this renderer only follows plain $Parameter values")
    whole = re.fullmatch(r"\$(\w+)", value)
    if whole:
        if whole.group(1) not in values:
            raise ValueError(f"{where} = {value}: no such parameter")
        return literal(values[whole.group(1)])
    return literal(value)


def _cluster(template: Template) -> Section:
    (cluster,) = template.sections("cluster")
    return cluster


def _node(cluster: Section, name: str) -> Section:
    found = [s for s in cluster.children if s.kind in ("node", "nodearray") and s.name == name]
    if len(found) != 1:
        raise ValueError(f"expected one node or nodearray {name!r}, found {len(found)}")
    return found[0]


def node_configuration(template: Template, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat configuration (``slurm.version`` -> "24.11.3-1") node ``name`` gets from its
    unnamed [[[configuration]]] sections: node defaults, then each node it Extends, then its own,
    with $Parameters at their defaults unless ``params`` (a params.json) gives them."""
    cluster = _cluster(template)
    values = parameter_values(template, params)
    chain = [_node(cluster, name)]
    while chain[0].get("Extends"):
        chain.insert(0, _node(cluster, chain[0].get("Extends") or ""))
    if name != "defaults":
        chain.insert(0, _node(cluster, "defaults"))
    merged: dict[str, Any] = {}
    for section in chain:
        for part in section.sections("configuration", ""):
            for key, value in part.attributes.items():
                merged[key] = _resolve(value, values, f"{part} {key}")
    return merged


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"slurm.accounting.enabled": False}`` -> ``{"slurm": {"accounting": {"enabled": False}}}``,
    the shape of ``jetpack config --json`` that install.py reads."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        branch = tree
        for part in parents:
            branch = branch.setdefault(part, {})
        branch[leaf] = value
    return tree


def count_nodes(template: Template, params: dict[str, Any] | None = None) -> dict[str, int]:
    """MaxCount of each nodearray, resolved."""
    cluster = _cluster(template)
    values = parameter_values(template, params)
    return {s.name: int(_resolve(s.get("MaxCount") or "0", values, f"{s} MaxCount"))
            for s in cluster.children if s.kind == "nodearray"}


def machine_types(template: Template, params: dict[str, Any] | None = None) -> dict[str, str]:
    cluster = _cluster(template)
    values = parameter_values(template, params)
    return {s.name: str(_resolve(s.get("MachineType") or "", values, f"{s} MachineType"))
            for s in cluster.children if s.kind == "nodearray"}


# --- what the installer and azslurm write ------------------------------------------------------


def _escape(name: str) -> str:
    """The installer's "safe" cluster name: lower case, anything but letters, digits and '-' -> '-'."""
    return re.sub(r"[^a-zA-Z0-9-]", "-", name).lower()


def render_slurm_conf(config: dict[str, Any], cluster_name: str = "mpistyle", hostname: str = "mpistyle-scheduler",
                      ipv4: str = "10.0.0.4") -> str:
    """slurm.conf as 4.0.0's installer writes it on the primary scheduler from ``config`` (nested,
    as jetpack gives it). Raises InstallerError where install.py would stop on a missing key."""
    slurm = config.get("slurm", {})
    for key in ("version", "accounting"):  # install.py reads both without a default (4.0.0 to 4.0.2)
        if key not in slurm:
            raise InstallerError(f"install.py reads config['slurm'][{key!r}] and stops with a KeyError: set slurm.{key}")
    name = _escape(cluster_name)
    variables = {
        "slurmctldhost": f"{hostname}({ipv4})",
        "cluster_name": name,
        "max_node_count": int(slurm.get("max_node_count", 10000)),
        "state_save_location": f"/sched/{name}/spool/slurmctld",
        "prolog": "/etc/slurm/prolog.d/*",
        "epilog": "/etc/slurm/epilog.d/*",
        "launch_parameters": slurm.get("launch_parameters", ""),
    }
    lines = [f"{key}={value.format(**variables)}" for key, value in SLURM_CONF_SETTINGS]
    lines += [f"Include {include}" for include in INCLUDES]
    text = "\n".join(lines) + f"\n\nSlurmCtldHost={variables['slurmctldhost']}"  # the installer ends it without a newline
    additional = slurm.get("additional", {}).get("config")
    if additional:
        # Appended after a comment line, as install.py does with slurm.additional.config.
        text += f"\n# Additional config from CycleCloud\n{additional}"
    return text + "\n"


def render_accounting_conf(config: dict[str, Any]) -> str:
    accounting = config["slurm"]["accounting"]
    if not accounting.get("enabled", False):
        return "AccountingStorageType=accounting_storage/none\n"
    raise NotImplementedError("slurm.accounting.enabled = true (slurmdbd) is not what the template sets")


def render_azure_conf(template: Template, params: dict[str, Any] | None = None,
                      shapes: dict[str, MachineShape] | None = None) -> str:
    """The partitions and cloud nodes ``azslurm partitions`` writes for the template's
    autoscaled nodearrays (4.0.0 cli.py _partitions; names and counts from partition.py)."""
    shapes = shapes or SHAPES
    counts, sizes = count_nodes(template, params), machine_types(template, params)
    lines = []
    for array, max_count in counts.items():
        slurm = nested(node_configuration(template, array, params)).get("slurm", {})
        if slurm.get("autoscale", True) in (None, False):  # azslurm leaves such a nodearray out
            continue
        shape = shapes[sizes[array]]
        memory_mb = int(shape.memory_gib * 1024)
        memory = max(1024, int(memory_mb - max(1024, memory_mb * 0.05)))  # 5% kept back for the OS
        use_pcpu = str(slurm.get("use_pcpu", True)).lower() == "true"
        cpus, threads = (shape.cores, max(1, shape.vcpus // shape.cores)) if use_pcpu else (shape.vcpus, 1)
        prefix = "# " if max_count <= 0 else ""
        name = f"{slurm.get('node_prefix') or ''}{array}"
        nodes = f"{name}-[1-{max_count}]" if max_count > 1 else f"{name}-1"
        default = "YES" if slurm.get("default_partition", False) else "NO"
        lines.append(f"{prefix}PartitionName={slurm.get('partition', array)} Nodes={nodes} Default={default} "
                     f"DefMemPerCPU={memory // cpus} MaxTime=INFINITE State=UP")
        gres = f" Gres=gpu:{shape.gpus}" if shape.gpus else ""
        lines.append(f"{prefix}Nodename={nodes} Feature=cloud STATE=CLOUD CPUs={cpus} ThreadsPerCore={threads} "
                     f"RealMemory={memory}{gres}")
    return "\n".join(lines) + "\n"


def write_slurm_config(folder: Path, template_path: Path, params: dict[str, Any] | None = None,
                       config_changes: dict[str, Any] | None = None) -> Path:
    """slurm.conf and the files it includes, as the scheduler would have them, in ``folder``.
    ``config_changes`` overrides keys of the scheduler's flat configuration (None removes one):
    how the tests show what a missing setting would do. Returns the path of slurm.conf."""
    template = load(template_path)
    flat = node_configuration(template, SCHEDULER, params)
    for key, value in (config_changes or {}).items():
        if value is None:
            flat.pop(key, None)
        else:
            flat[key] = value
    config = nested(flat)
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(render_slurm_conf(config))
    (folder / "accounting.conf").write_text(render_accounting_conf(config))
    (folder / "azure.conf").write_text(render_azure_conf(template, params))
    (folder / "keep_alive.conf").write_text("# SuspendExcNodes for nodes kept alive in CycleCloud: none yet\n")
    return conf


# --- the settings, for other tests and test clusters --------------------------------------------


def settings(conf_text: str) -> dict[str, str]:
    """Key -> value of the plain ``Key=value`` lines (no comments, Include, node or partition lines)."""
    found = {}
    for line in conf_text.splitlines():
        match = re.fullmatch(r"([A-Za-z]+)=(.*)", line.strip())
        if match and match.group(1).lower() not in ("nodename", "partitionname"):
            found[match.group(1)] = match.group(2)
    return found


def slurm_conf_settings(template_path: Path, params: dict[str, Any] | None = None) -> dict[str, str]:
    """Every plain setting of the scheduler's slurm.conf for this template."""
    template = load(template_path)
    return settings(render_slurm_conf(nested(node_configuration(template, SCHEDULER, params))))


def power_saving_settings(template_path: Path, params: dict[str, Any] | None = None) -> dict[str, str]:
    """The power-saving lines the template's slurm.conf has (SuspendTime, SuspendTimeout,
    ResumeTimeout, the three programs, SlurmctldParameters), as the installer writes them."""
    return {k: v for k, v in slurm_conf_settings(template_path, params).items() if k in POWER_SAVING_KEYS}


def node_failure_settings(template_path: Path, params: dict[str, Any] | None = None) -> dict[str, str]:
    """What the template's slurm.conf sets for nodes that stop answering: ReturnToService (from
    cyclecloud/slurm) and SlurmdTimeout (the template's slurm.additional.config); JobRequeue is
    left at Slurm's default, 1."""
    return {k: v for k, v in slurm_conf_settings(template_path, params).items() if k in NODE_FAILURE_KEYS}


# --- the local Slurm as a parser -----------------------------------------------------------------


def scontrol() -> str | None:
    return shutil.which("scontrol") or shutil.which("scontrol", path="/usr/bin:/usr/sbin")


def parse_with_local_slurm(conf: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Have the local Slurm read ``conf`` (and its Includes) the way every Slurm program does at
    start: ``scontrol show hostnames`` loads slurm.conf through the same parser and checks as
    slurmctld (read_config.c) before it does anything, and needs no daemon, port or munge. A file
    Slurm cannot process ends it with "fatal: Unable to process configuration file"; lesser
    problems are "error:" lines on stderr. Not covered: what only slurmctld checks later (plugins
    load, partitions name defined nodes, programs exist). The local Slurm is Debian's 22.05, the
    cluster's 24.11: a key 24.11 added would be refused here (unrecognized key), and a value
    22.05 does not know is an "error:" line; neither is in 4.0.0's slurm.conf."""
    return subprocess.run([scontrol() or "scontrol", "show", "hostnames", "parse-check"], env={"SLURM_CONF": str(conf)},
                          capture_output=True, text=True, timeout=timeout)
