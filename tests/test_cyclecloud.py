"""cyclecloud/ without Azure: the cluster template parsed and checked (structure, parameters and
their defaults, spot, autoscale from zero, shared NFS), against what the cyclecloud/slurm
integration it pins reads, and the slurm.conf that integration would write from it parsed by the
local Slurm; the cluster-init project and the parameters file checked against it, and the
cluster-init scripts run against a fake `jetpack` on the paths that need no root, apt or network.
bash -n and shellcheck of the scripts: test_sbatch_script.py."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cyclecloud_slurm_conf import (
    InstallerError,
    node_configuration,
    node_failure_settings,
    parse_with_local_slurm,
    power_saving_settings,
    scontrol,
    slurm_conf_settings,
    write_slurm_config,
)
from cyclecloud_template import (
    ATTRIBUTE,
    Section,
    Template,
    TemplateError,
    load,
    names_in_expression,
    parse,
    references,
    unquote,
)

from conftest import TESTS, service_missing

ROOT = TESTS.parent
CC = ROOT / "cyclecloud"
TEMPLATE = CC / "mpistyle-slurm.txt"
SPECS = CC / "specs"
SBATCH = ROOT / "slurm" / "style.sbatch"
NCV3 = ("Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3")
NCV3_PATTERN = re.compile(r"Standard_NC\d+r?s_v3")
GPU_SIZES_SOLD = ("Standard_NC4as_T4_v3", "Standard_NC24ads_A100_v4", "Standard_NC40ads_H100_v5")
# Parameters the user picks in the UI or params.json: no sensible default to give.
NO_DEFAULT_TYPES = {"Cloud.Credentials", "Cloud.Region", "Azure.Subnet", "String"}
CLUSTER_INIT = re.compile(r"^(?:(?P<locker>[\w.-]+)/)?(?P<project>[\w.-]+):(?P<spec>[\w.-]+):(?P<version>[\w.-]+)$")

# What the pinned integration reads from a node's configuration, from reading Azure/cyclecloud-slurm
# at tag 4.0.0: azure-slurm-install/install.py (InstallSettings.__init__, _load_config; the same
# reads in 4.0.1 and 4.0.2), which runs on the scheduler and on every execute node.
# Keys the template must set: read with no default, or with a default that breaks slurm.conf.
INSTALLER_NEEDS = {
    "slurm.version": "config['slurm']['version'] has no default: KeyError",
    "slurm.accounting": "4.0.0 to 4.0.2 fill in config['slurm']['acccounting'] (sic) when it is missing, then read "
                        "config['slurm']['accounting']: KeyError unless some slurm.accounting.* is set",
    "slurm.launch_parameters": "defaults to '', written as 'LaunchParameters=', which Slurm refuses",
}
# Keys the integration reads with a default that works (install.py; azure-slurm/slurmcc/partition.py
# for each nodearray; the chef roles and delayed_services recipe for slurm.role; the cluster-init
# scripts and azure-slurm/install.sh; imex_prolog.sh): any slurm.* key the template sets must be one
# of these or of INSTALLER_NEEDS, so that a misspelt key fails here instead of being ignored there.
INTEGRATION_READS = {
    "slurm.accounting.enabled", "slurm.accounting.user", "slurm.accounting.password", "slurm.accounting.url",
    "slurm.accounting.certificate_url", "slurm.accounting.storageloc", "slurm.autoscale_dir", "slurm.user.name",
    "slurm.user.group", "slurm.user.uid", "slurm.user.gid", "slurm.group.name", "slurm.use_nodename_as_hostname",
    "slurm.node_prefix", "slurm.ensure_waagent_monitor_hostname", "slurm.dynamic_config", "slurm.dynamic_feature",
    "slurm.max_node_count", "slurm.additional.config", "slurm.secondary_scheduler_name", "slurm.is_primary_scheduler",
    "slurm.ubuntu22_waagent_fix", "slurm.role", "slurm.hpc", "slurm.autoscale", "slurm.partition",
    "slurm.dampen_memory", "slurm.use_pcpu", "slurm.overallocation", "slurm.gpu_device_config",
    "slurm.default_partition", "slurm.do_install", "slurm.install_pkg", "slurm.autoscale_pkg", "slurm.project_name",
    "slurm.imex.enabled",
}
# What CycleCloud itself gives every node, and install.py reads: never the template's to set.
FROM_CYCLECLOUD = {"cyclecloud.cluster.name", "cyclecloud.node.name", "hostname", "ipaddress", "azure.metadata.compute.vmsize"}
# The rest of an execute node's start besides waiting for the environment (VM boot, jetpack, the
# apt installs of the every-node spec and of cyclecloud/slurm): at least this long. An estimate:
# nothing here measures it.
REST_OF_A_NODE_START_S = 10 * 60


@pytest.fixture(scope="module")
def template() -> Template:
    return load(TEMPLATE)


@pytest.fixture(scope="module")
def cluster(template: Template) -> Section:
    clusters = template.sections("cluster")
    assert len(clusters) == 1, f"expected exactly one [cluster ...], found {[str(c) for c in clusters]}"
    return clusters[0]


@pytest.fixture(scope="module")
def parameters(template: Template) -> dict[str, Section]:
    found: dict[str, Section] = {}
    for section in template.walk():
        if section.kind == "parameter":
            assert section.name not in found, f"parameter {section.name} defined twice"
            found[section.name] = section
    return found


@pytest.fixture(scope="module")
def project() -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    assert ini.read(CC / "project.ini"), "cyclecloud/project.ini missing"
    return ini


def one(parent: Section, kind: str, name: str) -> Section:
    matches = parent.sections(kind, name)
    assert len(matches) == 1, f"expected one {kind} {name!r} in {parent}, found {len(matches)}"
    return matches[0]


def configuration(section: Section, name: str = "") -> dict[str, str]:
    """The attributes of a node's [[[configuration NAME]]] sections."""
    merged: dict[str, str] = {}
    for part in section.sections("configuration", name):
        merged.update(part.attributes)
    return merged


def parameter_type(parameter: Section) -> str:
    """The declared ParameterType, else what the UI widget implies (CycleCloud's own templates
    type numbers by their NumberTextBox), else String."""
    declared = parameter.get("ParameterType")
    if declared:
        return declared
    if parameter.get("Widget.Plugin") == "pico.form.BooleanCheckBox":
        return "Boolean"
    if parameter.get("Config.Plugin") == "pico.form.NumberTextBox":
        return "Integer" if (parameter.get("Config.IntegerOnly") or "").lower() == "true" else "Number"
    return "String"


def template_value_fits(kind: str, text: str) -> bool:
    value = unquote(text)
    if kind == "Boolean":
        return value.lower() in ("true", "false")
    if kind == "Integer":
        return re.fullmatch(r"-?\d+", value) is not None
    if kind in ("Double", "Number"):
        try:
            float(value)
        except ValueError:
            return False
        return True
    if kind == "Cloud.MachineType":
        return value.startswith("Standard_")
    if kind == "Cloud.Image":  # a marketplace URN or a CycleCloud image name
        return re.fullmatch(r"[\w.-]+:[\w.-]+:[\w.-]+:[\w.-]+", value) is not None or value.startswith("cycle.image.")
    return bool(value)


def json_value_fits(kind: str, value: object) -> bool:
    if kind == "Boolean":
        return isinstance(value, bool)
    if kind == "Integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("Double", "Number"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "Cloud.MachineType":
        return isinstance(value, str) and value.startswith("Standard_")
    return isinstance(value, str) and template_value_fits(kind, value)


# --- structure ---------------------------------------------------------------------------------


def test_one_cluster_with_node_defaults_a_scheduler_and_partitions(cluster: Section) -> None:
    one(cluster, "node", "defaults")
    one(cluster, "node", "scheduler")
    one(cluster, "nodearray", "gpu")
    one(cluster, "nodearray", "cpu")
    assert configuration(one(cluster, "node", "scheduler")).get("slurm.role") == "scheduler"


def test_gpu_and_cpu_nodearrays_extend_one_abstract_execute_base(cluster: Section) -> None:
    gpu, cpu = one(cluster, "nodearray", "gpu"), one(cluster, "nodearray", "cpu")
    base_name = gpu.get("Extends")
    assert base_name, "[[nodearray gpu]] has no Extends"
    assert cpu.get("Extends") == base_name, "the cpu nodearray should extend the same base as gpu"
    base = one(cluster, "node", base_name)
    assert (base.get("Abstract") or "").lower() == "true", f"{base} must be Abstract = true"
    settings = configuration(base)
    assert settings.get("slurm.role") == "execute"
    assert settings.get("slurm.autoscale") == "true"
    assert "mpistyle:execute:" in " ".join(s.name for s in base.sections("cluster-init"))


def test_gpu_is_the_default_partition(cluster: Section) -> None:
    gpu = configuration(one(cluster, "nodearray", "gpu"))
    cpu = configuration(one(cluster, "nodearray", "cpu"))
    assert gpu.get("slurm.partition") == "gpu" and gpu.get("slurm.default_partition") == "true"
    assert cpu.get("slurm.partition") == "cpu" and cpu.get("slurm.default_partition", "false") == "false"
    assert gpu.get("mpistyle.expect_gpu") == "true" and cpu.get("mpistyle.expect_gpu") == "false"


# --- parameters ---------------------------------------------------------------------------------


def test_every_reference_is_a_parameter_and_every_parameter_is_used(cluster: Section, parameters: dict[str, Section]) -> None:
    used = references(cluster)
    undefined = {name: where for name, where in used.items() if name not in parameters}
    assert not undefined, f"referenced but not defined as [[[parameter ...]]]: {undefined}"
    unused = sorted(set(parameters) - set(used))
    assert not unused, f"parameters the cluster never reads: {unused}"


def test_parameter_conditions_name_parameters(parameters: dict[str, Section]) -> None:
    for parameter in parameters.values():
        for key in parameter.attributes:
            if key.startswith("conditions."):
                names = names_in_expression(parameter.attributes[key])
                assert names and names <= set(parameters), f"{parameter} {key} reads unknown names {names - set(parameters)}"


def test_defaults_have_their_parameters_type(parameters: dict[str, Section]) -> None:
    wrong, missing = [], []
    for name, parameter in parameters.items():
        kind, default = parameter_type(parameter), parameter.get("DefaultValue")
        if default is None:
            if kind not in NO_DEFAULT_TYPES:
                missing.append(f"{name} ({kind})")
        elif not template_value_fits(kind, default):
            wrong.append(f"{name} ({kind}) = {default!r}")
        minimum = parameter.get("Config.MinValue")
        if default is not None and minimum is not None:
            assert float(unquote(default)) >= float(minimum), f"{name}: default {default} below Config.MinValue {minimum}"
    assert not wrong, f"defaults that do not fit their ParameterType: {wrong}"
    assert not missing, f"parameters that need a DefaultValue: {missing}"


def test_gpu_default_is_still_sold_and_ncv3_stays_selectable_with_a_retirement_note(parameters: dict[str, Section]) -> None:
    gpu = parameters["GPUMachineType"]
    assert gpu.get("ParameterType") == "Cloud.MachineType"
    default = unquote(gpu.get("DefaultValue") or "")
    assert not NCV3_PATTERN.fullmatch(default), f"{default} is NCv3, retired by Azure on 2025-09-30"
    assert default in GPU_SIZES_SOLD
    # Selectable: nothing narrows the machine type list; the retirement is said where one picks.
    assert gpu.get("Config.Filter") is None and gpu.get("Config.Entries") is None
    description = unquote(gpu.get("Description") or "")
    for size in (*NCV3, *GPU_SIZES_SOLD):
        assert size in description, f"GPUMachineType's description should name {size}"
    assert "retired" in description and "2025-09-30" in description
    readme = (CC / "README.md").read_text()
    assert "2025-09-30" in readme and all(size in readme for size in NCV3)


def test_execute_nodearrays_autoscale_from_zero(cluster: Section, parameters: dict[str, Section]) -> None:
    assert cluster.get("Autoscale") == "$Autoscale"
    assert parameters["Autoscale"].get("DefaultValue") == "true"
    for name in ("gpu", "cpu"):
        array = one(cluster, "nodearray", name)
        assert array.get("InitialCount", "0") == "0", f"{array} should start with no nodes"
        limit = re.fullmatch(r"\$(\w+)", array.get("MaxCount") or "")
        assert limit, f"{array} MaxCount should be a parameter"
        maximum = parameters[limit.group(1)]
        assert parameter_type(maximum) == "Integer"
        assert maximum.get("Config.MinValue") == "0", f"{maximum} should allow 0 nodes"
        assert int(maximum.get("DefaultValue") or 0) >= 1


def test_gpu_nodes_can_be_spot_with_a_max_price(cluster: Section, parameters: dict[str, Section]) -> None:
    gpu = one(cluster, "nodearray", "gpu")
    assert gpu.get("Interruptible") == "$UseLowPrio"
    assert gpu.get("MaxPrice") == "$SpotMaxPrice"
    assert parameter_type(parameters["UseLowPrio"]) == "Boolean"
    assert parameter_type(parameters["SpotMaxPrice"]) in ("Double", "Number")
    assert float(parameters["SpotMaxPrice"].get("DefaultValue") or "nan") == -1  # -1: never evicted for price
    assert names_in_expression(parameters["SpotMaxPrice"].get("Conditions.Excluded") or "") == {"UseLowPrio"}


def test_nodes_go_in_the_subnet_parameter(cluster: Section, parameters: dict[str, Section]) -> None:
    assert one(cluster, "node", "defaults").get("SubnetId") == "$SubnetId"
    subnet = parameters["SubnetId"]
    assert subnet.get("ParameterType") == "Azure.Subnet" and (subnet.get("Required") or "").lower() == "true"


def test_shared_is_nfs_on_every_node_from_the_scheduler_or_an_external_server(cluster: Section) -> None:
    defaults, scheduler = one(cluster, "node", "defaults"), one(cluster, "node", "scheduler")
    mount = configuration(defaults, "cyclecloud.mounts.nfs_shared")
    assert mount.get("type") == "nfs" and mount.get("mountpoint") == "/shared"
    address = mount.get("address", "").removeprefix("${").removesuffix("}")
    assert names_in_expression(address) == {"UseBuiltinShared", "NFSAddress"}
    assert configuration(defaults).get("mpistyle.root", "").startswith("/shared/")
    volumes = [v for v in scheduler.sections("volume") if v.get("Mount") == "builtinshared"]
    assert len(volumes) == 1 and volumes[0].get("Disabled") == "${!UseBuiltinShared}"
    assert configuration(scheduler, "cyclecloud.mounts.builtinshared").get("mountpoint") == "/shared"
    assert configuration(scheduler, "cyclecloud.exports.builtinshared").get("export_path") == "/shared"


def test_what_every_node_mounts_keeps_its_value_with_the_builtin_shared(cluster: Section, parameters: dict[str, Section]) -> None:
    """An Excluded parameter has no value at all. The nfs_shared mount applies to every execute
    node whichever server it uses, so a parameter it reads plainly ($Name) may be hidden from the
    form with the built-in server but not excluded (Azure's template: Conditions.Hidden)."""
    mount = configuration(one(cluster, "node", "defaults"), "cyclecloud.mounts.nfs_shared")
    read = {name for value in mount.values() for name in re.findall(r"^\$(\w+)$", value)}
    assert "NFSSharedExportPath" in read
    for name in read:
        assert parameters[name].get("Conditions.Excluded") is None, f"{name} is read by every node's /shared mount"
    assert unquote(parameters["NFSSharedExportPath"].get("DefaultValue") or "") == "/shared"


def test_values_are_plain_words_or_quoted_whole() -> None:
    """CycleCloud reads a quote as the start of a string: an unquoted value with an apostrophe in
    it ("the scheduler's disk") is not plain text to it. Quote such a value whole."""
    wrong = []
    for number, raw in enumerate(TEMPLATE.read_text().splitlines(), 1):
        line = raw.strip()
        attribute = ATTRIBUTE.match(line)
        if line.startswith("#") or not attribute or attribute.group(2) == ":=":
            continue
        value = attribute.group(3).strip()
        if value.startswith("${") or value.startswith("'''"):
            continue  # an expression, whose string literals are its own; a multi-line string
        if value.startswith('"'):
            if not (len(value) >= 2 and value.endswith('"') and '"' not in value[1:-1]):
                wrong.append(f"line {number}: {line}")
        elif "'" in value or '"' in value:
            wrong.append(f"line {number}: {line}")
    assert not wrong, f"quote these values whole: {wrong}"


# --- what the pinned cyclecloud/slurm reads, and the slurm.conf it writes -------------------------


@pytest.mark.parametrize("node", ["scheduler", "gpu", "cpu"])
def test_every_node_sets_what_the_slurm_installer_needs(template: Template, node: str) -> None:
    flat = node_configuration(template, node)
    for key, why in INSTALLER_NEEDS.items():
        present = {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
        assert present, f"[[node {node}]] does not set {key}: {why}"
        assert all(str(v).strip() for v in present.values()), f"[[node {node}]] sets {key} empty: {why}"
    unknown = sorted(k for k in flat if k.startswith("slurm.") and k not in INSTALLER_NEEDS and k not in INTEGRATION_READS)
    assert not unknown, f"slurm.* keys cyclecloud/slurm 4.0.0 never reads (misspelt?): {unknown}"
    assert not FROM_CYCLECLOUD & set(flat), f"CycleCloud sets these itself: {FROM_CYCLECLOUD & set(flat)}"


def test_the_template_pins_the_integration_these_checks_were_read_from(template: Template) -> None:
    pinned = {m["version"] for s in template.walk() if s.kind == "cluster-init"
              for m in [CLUSTER_INIT.match(s.name)] if m and m["locker"] == "cyclecloud" and m["project"] == "slurm"}
    assert pinned == {"4.0.0"}, "INSTALLER_NEEDS, INTEGRATION_READS and cyclecloud_slurm_conf.py describe 4.0.0: read the new tag"


def params_example() -> dict[str, Any]:
    return json.loads((CC / "params.example.json").read_text())


@pytest.mark.parametrize("params", [None, "params.example.json"])
def test_the_slurm_conf_the_template_gives_parses_with_the_local_slurm(tmp_path: Path, params: str | None) -> None:
    if scontrol() is None:
        service_missing("Slurm (scontrol)", FileNotFoundError("scontrol"))
    conf = write_slurm_config(tmp_path, TEMPLATE, params_example() if params else None)
    done = parse_with_local_slurm(conf)
    assert done.returncode == 0, f"Slurm refuses {conf}: {done.stderr}"
    assert done.stdout == "parse-check\n"
    assert "error" not in done.stderr.lower(), done.stderr


def test_the_checks_catch_what_kept_the_template_from_starting(tmp_path: Path) -> None:
    """Without slurm.launch_parameters the installer writes "LaunchParameters=" and the local
    Slurm refuses the whole file, as 24.11 does on the scheduler; without any slurm.accounting.*
    the installer stops before writing anything."""
    if scontrol() is None:
        service_missing("Slurm (scontrol)", FileNotFoundError("scontrol"))
    conf = write_slurm_config(tmp_path / "no-launch", TEMPLATE, config_changes={"slurm.launch_parameters": None})
    assert "\nLaunchParameters=\n" in conf.read_text()
    done = parse_with_local_slurm(conf)
    assert done.returncode != 0 and "Unable to process configuration file" in done.stderr, done.stderr
    with pytest.raises(InstallerError, match="accounting"):
        write_slurm_config(tmp_path / "no-accounting", TEMPLATE, config_changes={"slurm.accounting.enabled": None})


def test_power_saving_and_node_failure_settings_are_the_installers() -> None:
    """Golden: what a test cluster copies to behave like the CycleCloud one (point 7 of issue 19)."""
    assert power_saving_settings(TEMPLATE) == {
        "SlurmctldParameters": "idle_on_node_suspend",
        "ResumeTimeout": "1800",
        "SuspendTimeout": "600",
        "SuspendTime": "300",
        "ResumeProgram": "/opt/azurehpc/slurm/resume_program.sh",
        "ResumeFailProgram": "/opt/azurehpc/slurm/resume_fail_program.sh",
        "SuspendProgram": "/opt/azurehpc/slurm/suspend_program.sh",
    }
    assert node_failure_settings(TEMPLATE) == {"ReturnToService": "2", "SlurmdTimeout": "120"}


def test_the_readme_quotes_the_slurm_settings_as_they_are() -> None:
    readme = (CC / "README.md").read_text()
    rendered = slurm_conf_settings(TEMPLATE)
    quoted = dict(re.findall(r"`([A-Z][a-z]\w*)=([^`\s]+)`", readme))  # Slurm's CamelCase keys
    for key in ("SuspendTime", "SuspendTimeout", "ResumeTimeout", "ReturnToService", "SlurmctldParameters", "SlurmdTimeout"):
        assert key in quoted, f"cyclecloud/README.md should say what {key} is"
    wrong = {k: (v, rendered.get(k)) for k, v in quoted.items() if k in rendered and rendered[k] != v}
    assert not wrong, f"cyclecloud/README.md quotes (README, slurm.conf): {wrong}"


# --- the cluster-init project and the parameters file ------------------------------------------


def test_project_ini_and_a_spec_for_every_cluster_init_of_the_project(
    template: Template, project: configparser.ConfigParser
) -> None:
    assert {"name", "type", "version"} <= set(project["project"]), "project.ini needs [project] name, type and version"
    name, version = project["project"]["name"], project["project"]["version"]
    referenced = set()
    for section in template.walk():
        if section.kind != "cluster-init":
            continue
        spec = CLUSTER_INIT.match(section.name)
        assert spec, f"{section}: expected [locker/]project:spec:version"
        if spec["project"] == name and spec["locker"] is None:
            assert spec["version"] == version, f"{section} names version {spec['version']}, project.ini has {version}"
            referenced.add(spec["spec"])
    assert referenced, f"the template uses no {name} spec"
    present = {path.name for path in SPECS.iterdir() if path.is_dir()}
    assert referenced == present, f"specs the template names {sorted(referenced)} vs specs/ holds {sorted(present)}"
    for spec_name in present:
        scripts = sorted((SPECS / spec_name / "cluster-init" / "scripts").glob("*"))
        assert scripts, f"specs/{spec_name} has no cluster-init scripts"
        for script in scripts:
            assert re.fullmatch(r"\d\d-[\w.-]+\.sh", script.name), f"{script}: cluster-init scripts are named NN-name.sh"
            assert os.access(script, os.X_OK), f"{script} is not executable"
            text = script.read_text()
            assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text


def test_params_example_sets_defined_parameters_with_fitting_values(parameters: dict[str, Section]) -> None:
    values = json.loads((CC / "params.example.json").read_text())
    unknown = sorted(set(values) - set(parameters))
    assert not unknown, f"params.example.json sets parameters the template does not define: {unknown}"
    assert {"Credentials", "Region", "SubnetId"} <= set(values), "the parameters with no default should be in the example"
    wrong = {name: value for name, value in values.items() if not json_value_fits(parameter_type(parameters[name]), value)}
    assert not wrong, f"values that do not fit their ParameterType: {wrong}"


# --- the cluster-init scripts ------------------------------------------------------------------


def sbatch_reads() -> set[str]:
    return set(re.findall(r"\$\{(MPISTYLE_\w+)", SBATCH.read_text()))


def test_profile_exports_what_style_sbatch_reads(tmp_path: Path) -> None:
    profile = SPECS / "default" / "cluster-init" / "files" / "mpistyle-profile.sh"
    installer = (SPECS / "default" / "cluster-init" / "scripts" / "10-install-mpistyle.sh").read_text()
    assert "files/mpistyle-profile.sh" in installer and "/etc/profile.d/mpistyle.sh" in installer
    root = tmp_path / "shared" / "mpistyle"
    installed = tmp_path / "mpistyle.sh"
    installed.write_text(profile.read_text().replace("@MPISTYLE_ROOT@", str(root)))
    # Read twice, as nested login shells do: PATH must not grow.
    shell = shutil.which("dash") or "sh"
    done = subprocess.run([shell, "-c", f'. "{installed}"; . "{installed}"; env'],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert env["MPISTYLE_PYTHON"] == f"{root}/venv/bin/python"
    assert env["MPISTYLE_STAGING"] == f"{root}/staging"
    assert env["MPISTYLE_RUNS_DIR"] == f"{root}/runs"
    assert env["PATH"] == f"{root}/venv/bin:/usr/bin:/bin"
    exported = {name for name in env if name.startswith("MPISTYLE_")}
    assert exported <= sbatch_reads(), f"the profile sets variables style.sbatch never reads: {exported - sbatch_reads()}"


def run_script(spec: str, name: str, tmp_path: Path, config: dict[str, str],
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a cluster-init script with a fake `jetpack config KEY DEFAULT` answering from config."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    jetpack = bin_dir / "jetpack"
    jetpack.write_text('#!/bin/bash\n[ "$1" = config ] || exit 2\nvar="FAKE_JETPACK_${2//./_}"\nprintf "%s\\n" "${!var-$3}"\n')
    jetpack.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **{f"FAKE_JETPACK_{k.replace('.', '_')}": v for k, v in config.items()},
           **(extra_env or {})}
    script = SPECS / spec / "cluster-init" / "scripts" / name
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_scheduler_script_waits_for_its_source_then_skips_an_up_to_date_environment(tmp_path: Path) -> None:
    root = tmp_path / "shared" / "mpistyle"
    root.parent.mkdir()
    config = {"mpistyle.root": str(root), "mpistyle.source": str(root / "src"), "mpistyle.torch": "torch==2.13.0",
              "mpistyle.python": "/nonexistent/python3"}

    done = run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, config)
    assert done.returncode == 0, done.stderr
    assert "nothing to install yet" in done.stdout and f"{root}/src does not exist" in done.stdout
    for shared in ("staging", "runs"):
        assert (root / shared).stat().st_mode & 0o7777 == 0o1777, f"{shared} should be world-writable and sticky"

    (root / "src").mkdir()
    (root / "venv").mkdir()
    marker = root / "venv" / ".mpistyle-install"
    marker.write_text(f"source={root}/src\ntorch=torch==2.13.0\npython=/nonexistent/python3\n")
    done = run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, config)
    assert done.returncode == 0 and "up to date" in done.stdout, done.stdout + done.stderr

    # Another torch: a rebuild, which stops at the missing interpreter before touching the old one.
    done = run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, config, {"MPISTYLE_TORCH": "torch==2.12.0"})
    assert done.returncode == 1 and "/nonexistent/python3 not found" in done.stderr
    assert marker.exists()


def test_execute_script_fails_clearly_without_the_shared_environment(tmp_path: Path) -> None:
    config = {"mpistyle.root": str(tmp_path / "mpistyle"), "mpistyle.expect_gpu": "False", "mpistyle.venv_wait_minutes": "0"}
    done = run_script("execute", "20-check-node.sh", tmp_path, config)
    assert done.returncode == 1
    assert f"{tmp_path}/mpistyle/venv is not ready after 0 minute(s)" in done.stderr


def test_a_failed_build_at_boot_leaves_slurmctld_to_start_and_stops_the_execute_nodes_waiting(tmp_path: Path) -> None:
    """cyclecloud/slurm starts slurmctld only once every cluster-init script of the scheduler has
    succeeded: under cluster-init (CYCLECLOUD_SPEC_PATH set) the build's failure is reported and
    recorded, and the script succeeds. Run by hand it fails."""
    root = tmp_path / "shared" / "mpistyle"
    (root / "src").mkdir(parents=True)
    python = tmp_path / "python3"
    python.write_text("#!/bin/bash\necho 'python3: No module named venv' >&2\nexit 1\n")
    python.chmod(0o755)
    config = {"mpistyle.root": str(root), "mpistyle.source": str(root / "src"), "mpistyle.torch": "torch==2.13.0",
              "mpistyle.python": str(python)}
    at_boot = {"CYCLECLOUD_SPEC_PATH": str(SPECS / "scheduler" / "cluster-init")}
    record = root / ".install-failed"

    by_hand = run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, config)
    assert by_hand.returncode == 1 and "No module named venv" in by_hand.stderr

    boot = run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, config, at_boot)
    assert boot.returncode == 0, f"a failing cluster-init script keeps slurmctld from starting: {boot.stderr}"
    assert f"error: {root}/venv was not built; slurmctld starts anyway" in boot.stderr
    assert "failed" in record.read_text() and not (root / "venv" / ".mpistyle-install").exists()

    # The execute nodes stop waiting at once and say why, instead of after mpistyle.venv_wait_minutes.
    node = {"mpistyle.root": str(root), "mpistyle.expect_gpu": "False", "mpistyle.venv_wait_minutes": "30"}
    done = run_script("execute", "20-check-node.sh", tmp_path, node)
    assert done.returncode == 1 and "the scheduler could not build" in done.stderr and "failed" in done.stderr

    # Once the environment is in place (here: its marker), the record goes.
    (root / "venv").mkdir(exist_ok=True)
    (root / "venv" / ".mpistyle-install").write_text(f"source={root}/src\ntorch=torch==2.13.0\npython={python}\n")
    assert run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, config, at_boot).returncode == 0
    assert not record.exists()

    # Without the shared filesystem at all there is nothing to record, and slurmctld still starts.
    missing = {**config, "mpistyle.root": str(tmp_path / "not-mounted" / "mpistyle")}
    done = run_script("scheduler", "20-mpistyle-venv.sh", tmp_path, missing, at_boot)
    assert done.returncode == 0 and "is the shared filesystem mounted?" in done.stderr


def test_execute_nodes_give_up_waiting_before_slurm_gives_up_on_them() -> None:
    """Slurm marks a node down and shuts it down when it has not registered ResumeTimeout after
    Slurm asked for it; a node that waits longer for the environment never fails with its own
    reason (slurmd starts only after the cluster-init scripts)."""
    script = (SPECS / "execute" / "cluster-init" / "scripts" / "20-check-node.sh").read_text()
    wait = re.search(r"jetpack config mpistyle\.venv_wait_minutes (\d+)", script)
    assert wait, "20-check-node.sh should read mpistyle.venv_wait_minutes with a default"
    resume_timeout = int(power_saving_settings(TEMPLATE)["ResumeTimeout"])
    assert int(wait.group(1)) * 60 + REST_OF_A_NODE_START_S <= resume_timeout
    readme = (CC / "README.md").read_text()
    said = re.search(r"`mpistyle\.venv_wait_minutes`,? (\d+) minutes by default", " ".join(readme.split()))
    assert said and said.group(1) == wait.group(1), "cyclecloud/README.md should give the same default wait"


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None, reason="this machine has nvidia-smi")
def test_execute_script_refuses_a_gpu_node_without_a_driver(tmp_path: Path) -> None:
    config = {"mpistyle.root": str(tmp_path / "mpistyle"), "mpistyle.expect_gpu": "True", "mpistyle.venv_wait_minutes": "0"}
    done = run_script("execute", "20-check-node.sh", tmp_path, config)
    assert done.returncode == 1 and "no working nvidia-smi on this GPU node" in done.stderr


# --- the parser itself ---------------------------------------------------------------------------


def test_parser_reads_nesting_expressions_and_rejects_malformed_text() -> None:
    parsed = parse(
        "# comment\n[cluster c]\nAutoscale = $Auto\n  [[node defaults]]\n  SubnetId = ${ifThenElse(Fixed, \"a/b\", Burst)}\n"
        "    [[[configuration]]]\n    x.y = ${!Flag && size(Name) > 2}\n"
        "[parameters P]\n  [[parameters Q]]\n    [[[parameter Auto]]]\n    Conditions.Hidden := Other isnt true\n"
    )
    cluster = parsed.sections("cluster")[0]
    assert cluster.name == "c" and one(cluster, "node", "defaults").sections("configuration")[0].get("X.Y")
    assert set(references(cluster)) == {"Auto", "Fixed", "Burst", "Flag", "Name"}
    assert names_in_expression("Other isnt true") == {"Other"}
    for bad in ("[cluster c]\n[[[node n]]]\n", "Key = value\n", "[cluster c]]\n", "[cluster c]\nnot an attribute\n",
                "[cluster c]\nA = 1\nA = 2\n"):
        with pytest.raises(TemplateError):
            parse(bad)
