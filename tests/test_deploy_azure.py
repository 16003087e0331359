"""deploy/azure/ without Azure: main.json (the storage side of mpistyle-watch) linted by checkov
and evaluated here (tests/arm_template.py) for what a deployment would make: every role
assignment scoped to one container or the queue with the right built-in role, the Event Grid
subscription filtered to the input container's BlobCreated events and delivering to the queue,
secure account settings, and outputs the watcher's own config accepts; and deploy.sh driven
against a stand-in `az`. (bash -n and shellcheck of deploy.sh: test_sbatch_script.py.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module

from arm_template import RESOURCE_GROUP_ID, SUBSCRIPTION, Call, ExpressionError, Template, expressions, parse, resource_id
from mpistyle.watch import config as watch_config

from conftest import TESTS

ROOT = TESTS.parent
AZURE = ROOT / "deploy" / "azure"
MAIN = AZURE / "main.json"
DEPLOY = AZURE / "deploy.sh"
CHECKOV = ROOT / ".cache" / "checkov" / "bin" / "checkov"

# Azure's built-in roles, by id (learn.microsoft.com, "Azure built-in roles for Storage").
BLOB_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"  # Storage Blob Data Reader: read, list
BLOB_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"  # Storage Blob Data Contributor: read, write, delete
QUEUE_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"  # Storage Queue Data Contributor: receive, update (hide), delete
QUEUE_SENDER = "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a"  # Storage Queue Data Message Sender: add
ROLE_ASSIGNMENT = "Microsoft.Authorization/roleAssignments"
CONTAINER = "Microsoft.Storage/storageAccounts/blobServices/containers"
QUEUE = "Microsoft.Storage/storageAccounts/queueServices/queues"
ACCOUNT = "Microsoft.Storage/storageAccounts"
# The lint findings the template suppresses, each with its reason in the resource's metadata.
ALLOWED_SKIPS = {"CKV_AZURE_35", "CKV_AZURE_43", "CKV_AZURE_59", "CKV_AZURE_206"}


@pytest.fixture(scope="module")
def template() -> Template:
    return Template(MAIN)


def scope_of(template: Template, assignment: dict[str, Any]) -> tuple[str, str, str]:
    """(kind, account, name) of a role assignment's scope: kind 'container' or 'queue'."""
    scope = template.evaluate(assignment["scope"])
    patterns = {
        "container": r"Microsoft\.Storage/storageAccounts/([^/]+)/blobServices/default/containers/([^/]+)",
        "queue": r"Microsoft\.Storage/storageAccounts/([^/]+)/queueServices/default/queues/([^/]+)",
    }
    for kind, pattern in patterns.items():
        match = re.fullmatch(pattern, scope)
        if match:
            return kind, match.group(1), match.group(2)
    raise AssertionError(f"role assignment {assignment['name']} is scoped to {scope}, not to one container or queue")


def principal_resource(template: Template, assignment: dict[str, Any]) -> str:
    """The id of the resource whose identity a role assignment's principalId is: reference(ID, ...)."""
    call = parse(assignment["properties"]["principalId"][1:-1])
    while not isinstance(call, Call):
        call = call.target
    assert call.function == "reference", f"principalId of {assignment['name']} is not read with reference()"
    return str(template.eval_node(call.args[0]))


def assignments(template: Template) -> dict[tuple[str, str, str, str], str]:
    """{(scope kind, account, container or queue, role id): principal} for every role assignment."""
    found: dict[tuple[str, str, str, str], str] = {}
    for assignment in template.of_type(ROLE_ASSIGNMENT):
        properties = template.evaluate(assignment["properties"])
        role = properties["roleDefinitionId"]
        prefix = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Authorization/roleDefinitions/"
        assert role.startswith(prefix), f"{role}: not a built-in role's subscription-level id"
        if "reference(" in assignment["properties"]["principalId"]:  # an identity this deployment makes
            assert properties["principalType"] == "ServicePrincipal"  # so no wait for Entra replication
        key = (*scope_of(template, assignment), role.removeprefix(prefix))
        assert key not in found, f"{key} assigned twice"
        found[key] = properties["principalId"]
    return found


# -- the template as ARM reads it ------------------------------------------------------------------


def test_every_expression_parses_and_evaluates(template: Template) -> None:
    assert template.data["$schema"] == "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"
    assert template.data["contentVersion"] == "1.0.0.0"
    found = expressions(template.data)
    assert len(found) > 50
    for expression in found:
        parse(expression[1:-1])
    for resource in template.data["resources"]:  # those a condition leaves out too
        template.evaluate({k: v for k, v in resource.items() if k != "metadata"})
    template.outputs()
    assert set(template.data["parameters"]) == template.used_parameters, "a parameter nothing uses"
    assert set(template.data["variables"]) == template.used_variables, "a variable nothing uses"


@pytest.mark.parametrize("broken", ["[format('{0}', parameters('nope'))]", "[concat('a', 'b']", "[toUpperCase('a')]"])
def test_the_evaluator_refuses_what_arm_would(template: Template, broken: str) -> None:
    with pytest.raises(ExpressionError):
        template.evaluate(broken)


def test_every_dependency_is_a_resource_of_the_template(template: Template) -> None:
    ids = [template.resource_id_of(r).lower() for r in template.resources]
    assert len(ids) == len(set(ids)), "two resources with one id"
    for resource in template.resources:
        for dependency in template.evaluate(resource.get("dependsOn", [])):
            assert dependency.lower() in ids, f"{resource['type']} depends on {dependency}, which the template does not make"


def test_api_versions_are_literal_and_one_per_provider(template: Template) -> None:
    """Linters read literal versions only; one version per provider keeps reference() calls right."""
    versions: dict[str, set[str]] = {}
    for resource in template.resources:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", resource["apiVersion"]), resource["apiVersion"]
        versions.setdefault(resource["type"].split("/")[0], set()).add(resource["apiVersion"])
    assert all(len(v) == 1 for v in versions.values()), versions


def test_names_azure_accepts(template: Template) -> None:
    for account in template.of_type(ACCOUNT):
        name = template.evaluate(account["name"])
        assert re.fullmatch(r"[a-z0-9]{3,24}", name), f"storage account name {name!r}"
    for resource in [*template.of_type(CONTAINER), *template.of_type(QUEUE)]:
        name = template.evaluate(resource["name"]).rsplit("/", 1)[1]
        assert re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]", name), f"container or queue name {name!r}"
    long_prefix = Template(MAIN, {"namePrefix": "mpistylevid"})
    assert all(len(long_prefix.evaluate(a["name"])) == 24 for a in long_prefix.of_type(ACCOUNT))


# -- least privilege --------------------------------------------------------------------------------


def test_each_role_is_scoped_to_its_container_or_queue(template: Template) -> None:
    data, ops = (template.parameter(n) for n in ("dataAccountName", "opsAccountName"))
    watcher = template.reference(template.outputs()["identityResourceId"], "2023-01-31")["principalId"]
    topic = template.of_type("Microsoft.EventGrid/systemTopics")[0]
    events = template.reference(template.resource_id_of(topic), topic["apiVersion"], "Full")["identity"]["principalId"]
    assert assignments(template) == {
        ("container", data, "videos-in", BLOB_READER): watcher,
        ("container", data, "videos-out", BLOB_CONTRIBUTOR): watcher,
        ("container", ops, "mpistyle", BLOB_CONTRIBUTOR): watcher,
        ("queue", ops, "mpistyle-events", QUEUE_CONTRIBUTOR): watcher,
        # Event Grid delivers with its system topic's own identity: no account key involved.
        ("queue", ops, "mpistyle-events", QUEUE_SENDER): events,
        ("container", ops, "mpistyle-deadletter", BLOB_CONTRIBUTOR): events,
    }


def test_role_assignments_follow_renamed_containers_and_queue() -> None:
    renamed = Template(MAIN, {"inputContainer": "uploads", "outputContainer": "styled", "workContainer": "state",
                              "queueName": "blob-events", "deadLetterContainer": "undelivered"})
    assert {(kind, name, role) for kind, _, name, role in assignments(renamed)} == {
        ("container", "uploads", BLOB_READER), ("container", "styled", BLOB_CONTRIBUTOR),
        ("container", "state", BLOB_CONTRIBUTOR), ("queue", "blob-events", QUEUE_CONTRIBUTOR),
        ("queue", "blob-events", QUEUE_SENDER), ("container", "undelivered", BLOB_CONTRIBUTOR),
    }


def test_uploaders_get_their_two_roles_only_when_named() -> None:
    template = Template(MAIN, {"uploaderPrincipalId": "11111111-2222-3333-4444-555555555555", "uploaderPrincipalType": "User"})
    data = template.parameter("dataAccountName")
    uploader = {key: principal for key, principal in assignments(template).items() if principal.startswith("1111")}
    assert uploader == {
        ("container", data, "videos-in", BLOB_CONTRIBUTOR): "11111111-2222-3333-4444-555555555555",
        ("container", data, "videos-out", BLOB_READER): "11111111-2222-3333-4444-555555555555",
    }
    types = {template.evaluate(a["properties"]["principalType"]) for a in template.of_type(ROLE_ASSIGNMENT)}
    assert types == {"ServicePrincipal", "User"}
    assert len(template.of_type(ROLE_ASSIGNMENT)) == len(Template(MAIN).of_type(ROLE_ASSIGNMENT)) + 2


def test_every_assignment_waits_for_its_scope_and_principal() -> None:
    template = Template(MAIN, {"uploaderPrincipalId": "11111111-2222-3333-4444-555555555555"})
    for assignment in template.of_type(ROLE_ASSIGNMENT):
        scope = template.evaluate(assignment["scope"])
        needs = {d.lower() for d in template.evaluate(assignment["dependsOn"])}
        assert f"{RESOURCE_GROUP_ID}/providers/{scope}".lower() in needs, f"{assignment['name']} does not wait for {scope}"
        if "reference(" in assignment["properties"]["principalId"]:  # else a principal from outside
            principal = principal_resource(template, assignment)
            assert principal.lower() in needs, f"{assignment['name']} does not wait for {principal}"


def test_storage_accounts_are_locked_down(template: Template) -> None:
    for account in template.of_type(ACCOUNT):
        properties = template.evaluate(account["properties"])
        assert properties["allowSharedKeyAccess"] is False  # the watcher uses its managed identity
        assert properties["allowBlobPublicAccess"] is False
        assert properties["minimumTlsVersion"] == "TLS1_2"
        assert properties["supportsHttpsTrafficOnly"] is True
        assert properties["defaultToOAuthAuthentication"] is True
        assert properties["allowCrossTenantReplication"] is False
        assert account["kind"] == "StorageV2"
    for container in template.of_type(CONTAINER):
        assert container["properties"]["publicAccess"] == "None"
    keyed = Template(MAIN, {"allowSharedKeyAccess": True})
    assert all(keyed.evaluate(a["properties"])["allowSharedKeyAccess"] is True for a in keyed.of_type(ACCOUNT))


# -- events -----------------------------------------------------------------------------------------


def test_blob_created_in_the_input_container_goes_to_the_queue(template: Template) -> None:
    topics = template.of_type("Microsoft.EventGrid/systemTopics")
    subscriptions = template.of_type("Microsoft.EventGrid/systemTopics/eventSubscriptions")
    assert len(topics) == 1 and len(subscriptions) == 1
    topic, subscription = topics[0], subscriptions[0]
    data, ops = (template.parameter(n) for n in ("dataAccountName", "opsAccountName"))
    assert topic["identity"] == {"type": "SystemAssigned"}
    assert template.evaluate(topic["properties"]) == {
        "source": resource_id(ACCOUNT, data),
        "topicType": "Microsoft.Storage.StorageAccounts",
    }
    assert template.evaluate(subscription["name"]).split("/")[0] == template.evaluate(topic["name"])

    properties = template.evaluate(subscription["properties"])
    assert properties["eventDeliverySchema"] == "EventGridSchema"
    assert properties["filter"]["includedEventTypes"] == ["Microsoft.Storage.BlobCreated"]
    assert properties["filter"]["subjectBeginsWith"] == "/blobServices/default/containers/videos-in/blobs/"
    assert "destination" not in properties, "delivery must use the topic's identity (deliveryWithResourceIdentity)"
    delivery = properties["deliveryWithResourceIdentity"]
    assert delivery["identity"] == {"type": "SystemAssigned"}
    assert delivery["destination"]["endpointType"] == "StorageQueue"
    queue = delivery["destination"]["properties"]
    assert template.resource_by_id(f"{queue['resourceId']}/queueServices/default/queues/{queue['queueName']}")
    assert queue["resourceId"].endswith(f"/{ops}") and queue["queueName"] == "mpistyle-events"
    assert queue["queueMessageTimeToLiveInSeconds"] == -1

    retry = properties["retryPolicy"]
    assert 1 <= retry["maxDeliveryAttempts"] <= 30 and 1 <= retry["eventTimeToLiveInMinutes"] <= 1440
    dead = properties["deadLetterWithResourceIdentity"]
    assert dead["identity"] == {"type": "SystemAssigned"}
    assert dead["deadLetterDestination"]["endpointType"] == "StorageBlob"
    target = dead["deadLetterDestination"]["properties"]
    assert template.resource_by_id(f"{target['resourceId']}/blobServices/default/containers/{target['blobContainerName']}")
    assert target["blobContainerName"] != "videos-in", "dead letters in the input container would be taken for uploads"


def test_the_filter_follows_the_input_container() -> None:
    renamed = Template(MAIN, {"inputContainer": "uploads"})
    subscription = renamed.of_type("Microsoft.EventGrid/systemTopics/eventSubscriptions")[0]
    subject = renamed.evaluate(subscription["properties"])["filter"]["subjectBeginsWith"]
    assert subject == "/blobServices/default/containers/uploads/blobs/"


def test_the_subscription_waits_for_the_roles_it_delivers_with(template: Template) -> None:
    subscription = template.of_type("Microsoft.EventGrid/systemTopics/eventSubscriptions")[0]
    needs = {d.lower() for d in template.evaluate(subscription["dependsOn"])}
    topic = template.of_type("Microsoft.EventGrid/systemTopics")[0]
    topic_id = template.resource_id_of(topic)
    delivering = [a for a in template.of_type(ROLE_ASSIGNMENT) if principal_resource(template, a) == topic_id]
    assert len(delivering) == 2
    for assignment in delivering:
        assert template.resource_id_of(assignment).lower() in needs


# -- what the watcher is given ----------------------------------------------------------------------


def test_outputs_are_the_watcher_settings(template: Template) -> None:
    outputs = template.outputs()
    data, ops = (template.parameter(n) for n in ("dataAccountName", "opsAccountName"))
    assert outputs["inputContainerUrl"] == f"https://{data}.blob.core.windows.net/videos-in"
    assert outputs["outputContainerUrl"] == f"https://{data}.blob.core.windows.net/videos-out"
    assert outputs["workContainerUrl"] == f"https://{ops}.blob.core.windows.net/mpistyle"
    assert outputs["queueUrl"] == f"https://{ops}.queue.core.windows.net/mpistyle-events"
    assert outputs["queueName"] == "mpistyle-events"
    assert outputs["identityClientId"] == "client-of-mpistyle-watcher"
    overrides = dict(o.split("=", 1) for o in outputs["watcherOverrides"].split())
    assert overrides == {
        "storage": "blob", "intake": "queue",
        "storage.input.url": outputs["inputContainerUrl"], "storage.output.url": outputs["outputContainerUrl"],
        "storage.work.url": outputs["workContainerUrl"], "storage.queue.url": outputs["queueUrl"],
    }


def test_the_watcher_accepts_the_settings(template: Template) -> None:
    """The overrides compose into the watcher's own config and pass its checks, the queue intake
    included."""
    overrides = template.outputs()["watcherOverrides"].split()
    watch_config.register()
    with initialize_config_module(config_module="mpistyle.configs", version_base="1.3"):
        cfg = compose(config_name="watch", overrides=overrides)
    watch_config.check(cfg)
    for area in watch_config.AREAS:
        assert cfg.storage[area].kind == "blob" and cfg.storage[area].url.startswith("https://")
        assert cfg.storage[area].credential_env  # unset in the environment: DefaultAzureCredential
    assert cfg.intake == "queue" and cfg.storage.queue.url.startswith("https://")


# -- the linter ------------------------------------------------------------------------------------


def checkov() -> str:
    found = str(CHECKOV) if CHECKOV.exists() else shutil.which("checkov")
    if found is None:
        reason = "checkov not installed (scripts/setup.sh --test installs it into .cache/checkov)"
        if os.environ.get("MPISTYLE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def test_checkov_passes_the_template_and_fails_a_weakened_copy(tmp_path: Path) -> None:
    """checkov's ARM checks over main.json and over a copy with TLS 1.0, plain HTTP and public
    containers, in one run: the copy must fail, so a pass means something. (checkov silently
    drops failures of resources whose name calls toLower() and the like: the names avoid them.)"""
    text = MAIN.read_text()
    weakened = text.replace('"TLS1_2"', '"TLS1_0"').replace('"publicAccess": "None"', '"publicAccess": "Container"')
    weakened = weakened.replace('"supportsHttpsTrafficOnly": true', '"supportsHttpsTrafficOnly": false')
    (tmp_path / "main.json").write_text(text)
    (tmp_path / "weakened.json").write_text(weakened)
    done = subprocess.run(
        [checkov(), "--directory", str(tmp_path), "--framework", "arm", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LOG_LEVEL": "ERROR"},
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]

    def checks(outcome: str, file: str) -> list[str]:
        return sorted(c["check_id"] for c in results[outcome] if c["file_path"].endswith(file))

    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}"
              for c in results["failed_checks"] if c["file_path"].endswith("/main.json")]
    assert not failed, "\n".join(failed)
    assert set(checks("skipped_checks", "/main.json")) <= ALLOWED_SKIPS
    passed = checks("passed_checks", "/main.json")
    # Both accounts and all four containers were looked at, not dropped unrendered.
    assert passed.count("CKV_AZURE_3") == passed.count("CKV_AZURE_44") == 2 and passed.count("CKV_AZURE_34") == 4
    assert {"CKV_AZURE_3", "CKV_AZURE_34", "CKV_AZURE_44"} <= set(checks("failed_checks", "/weakened.json"))


# -- deploy.sh --------------------------------------------------------------------------------------

FAKE_AZ = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["AZ_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
outputs = json.loads(os.environ["AZ_OUTPUTS"])
if args[:2] == ["account", "show"]:
    sys.exit(1) if os.environ.get("AZ_LOGGED_OUT") else print("Test subscription")
elif args[:2] == ["provider", "show"]:
    print("NotRegistered" if args[3] == "Microsoft.EventGrid" else "Registered")
elif args[:3] == ["deployment", "group", "create"]:
    sys.exit(int(os.environ.get("AZ_DEPLOY_RC", "0")))
elif args[:3] == ["deployment", "group", "show"]:
    query = args[args.index("--query") + 1]
    print(outputs[query.split(".")[2]])
"""


def run_deploy(tmp_path: Path, template: Template, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    az = bin_dir / "az"
    az.write_text(FAKE_AZ.format(python=sys.executable))
    az.chmod(0o755)
    log = tmp_path / "az.log"
    log.write_text("")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AZ_LOG": str(log),
                "AZ_OUTPUTS": json.dumps(template.outputs()), **env}
    done = subprocess.run(["bash", str(DEPLOY), *args], capture_output=True, text=True, env=full_env, timeout=60)
    return done, [json.loads(line) for line in log.read_text().splitlines()]


def test_deploy_creates_the_group_deploys_and_prints_the_settings(tmp_path: Path, template: Template) -> None:
    done, calls = run_deploy(tmp_path, template, "-g", "rg1", "-l", "westeurope", "--create-group", "namePrefix=vids")
    assert done.returncode == 0, done.stderr
    assert ["provider", "register", "-n", "Microsoft.EventGrid", "--wait"] in calls
    assert ["group", "create", "-n", "rg1", "-l", "westeurope", "-o", "none"] in calls
    create = next(c for c in calls if c[:3] == ["deployment", "group", "create"])
    assert create[3:] == ["-g", "rg1", "-n", "mpistyle-storage", "--template-file", str(MAIN),
                          "--parameters", "namePrefix=vids", "location=westeurope", "-o", "none"]
    outputs = template.outputs()
    for override in outputs["watcherOverrides"].split():
        assert f"\n  {override}\n" in done.stdout
    assert f"AZURE_CLIENT_ID={outputs['identityClientId']}" in done.stdout
    assert f"--identities {outputs['identityResourceId']}" in done.stdout


def test_deploy_what_if_changes_nothing(tmp_path: Path, template: Template) -> None:
    done, calls = run_deploy(tmp_path, template, "-g", "rg1", "--what-if")
    assert done.returncode == 0, done.stderr
    assert [c[:3] for c in calls if c[0] == "deployment"] == [["deployment", "group", "what-if"]]


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        ((), {}, 2, "-g GROUP is required"),
        (("-g", "rg1", "--create-group"), {}, 2, "--create-group needs -l LOCATION"),
        (("-g", "rg1", "stray"), {}, 2, "neither an option nor a NAME=VALUE"),
        (("-g", "rg1", "--bogus"), {}, 2, "unknown option '--bogus'"),
        (("-g",), {}, 2, "-g needs a value"),
        (("-g", "rg1"), {"AZ_LOGGED_OUT": "1"}, 1, "run az login"),
        (("-g", "rg1"), {"AZ_DEPLOY_RC": "3"}, 1, "az deployment operation group list -g rg1 -n mpistyle-storage"),
    ],
)
def test_deploy_refuses_with_a_reason(
    tmp_path: Path, template: Template, args: tuple[str, ...], env: dict[str, str], code: int, message: str
) -> None:
    done, _ = run_deploy(tmp_path, template, *args, **env)
    assert done.returncode == code and message in done.stderr, (done.returncode, done.stderr)


def test_deploy_help_is_its_header() -> None:
    done = subprocess.run(["bash", str(DEPLOY), "--help"], capture_output=True, text=True, check=True)
    assert "deploy/azure/deploy.sh -g GROUP" in done.stdout and "Exit codes:" in done.stdout
    assert "set -euo" not in done.stdout
