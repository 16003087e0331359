"""intake=queue: the watcher reads Event Grid's BlobCreated events from an Azure Storage Queue
(Azurite's queue service, real messages in Event Grid's schema, base64-encoded as Event Grid
writes them) instead of listing the input every tick. Duplicates, out-of-order versions, events
for deleted blobs and other events; a video not finished in a tick comes back; a message whose
watcher kept dying is quarantined; the listing that finds what no event announced."""
from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hydra import compose, initialize_config_module

from azurite import KEY, Azurite
from mpistyle.errors import ConfigError
from mpistyle.sample import make_video
from mpistyle.watch import config as watch_config
from mpistyle.watch.intake import BlobCreated, Message, Unusable, blob_created, read, revisited
from mpistyle.watch.names import job_name
from test_watch import blob_setup, everything_written, run_watch, starts

from media import decode_all

watch_config.register()
CONTAINER_URL = "https://acct.blob.core.windows.net/videos-in"


def grid_event(name: str, etag: str | None, container: str = "videos-in", kind: str = "Microsoft.Storage.BlobCreated",
               blob_endpoint: str = "https://acct.blob.core.windows.net") -> dict[str, Any]:
    """An event in Event Grid's schema, as a storage account's system topic publishes it."""
    return {
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/media/providers/"
                 "Microsoft.Storage/storageAccounts/acct",
        "subject": f"/blobServices/default/containers/{container}/blobs/{name}",
        "eventType": kind,
        "id": str(uuid.uuid4()),
        "eventTime": datetime.now(UTC).isoformat(),
        "data": {
            "api": "PutBlob", "clientRequestId": str(uuid.uuid4()), "requestId": str(uuid.uuid4()),
            **({"eTag": etag} if etag else {}), "contentType": "video/mp4", "contentLength": 1000,
            "blobType": "BlockBlob", "url": f"{blob_endpoint}/{container}/{quote(name)}",
            "sequencer": "0000000000000000000000000000A1B2", "storageDiagnostics": {"batchId": str(uuid.uuid4())},
        },
        "dataVersion": "", "metadataVersion": "1",
    }


def as_queued(event: dict[str, Any] | list[dict[str, Any]]) -> str:
    """What Event Grid puts in the queue: the event's JSON, base64-encoded."""
    return base64.b64encode(json.dumps(event).encode()).decode()


def message(text: str, dequeue_count: int = 1) -> Message:
    return Message("id", "receipt", dequeue_count, text)


# -- reading messages ------------------------------------------------------------------------------


def test_an_event_is_read_base64_encoded_plain_or_as_an_array_of_one_and_a_revisit_counts() -> None:
    event = grid_event("in/clip.mp4", "0x8DA1")
    for text in (as_queued(event), json.dumps(event), as_queued([event])):
        assert read(message(text)).event == event and read(message(text)).revisits == 0
    again = read(message(revisited(read(message(as_queued(event))))))
    assert again.event == event and again.revisits == 1
    assert read(message(revisited(again))).revisits == 2
    for text, why in (("***", "neither JSON"), ("bm90IGpzb24=", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                      ('{"mpistyle_revisits": -1, "event": {}}', "not this watcher's")):
        with pytest.raises(Unusable, match=why):
            read(message(text))


def test_only_blob_created_events_of_the_input_container_and_prefix_name_a_video() -> None:
    event = grid_event("in/a b.mp4", '"0x8DA1"')
    assert blob_created(event, CONTAINER_URL, "in/") == BlobCreated("a b.mp4", "0x8DA1", event["id"])
    found = blob_created(grid_event("in/x.mp4", None), CONTAINER_URL, "in/")
    assert found.name == "x.mp4" and found.etag is None
    refused = {
        "not BlobCreated": grid_event("in/x.mp4", "1", kind="Microsoft.Storage.BlobDeleted"),
        "another container": grid_event("in/x.mp4", "1", container="other"),
        "another storage account": grid_event("in/x.mp4", "1", blob_endpoint="https://elsewhere.blob.core.windows.net"),
        "outside the input prefix": grid_event("out/x.mp4", "1"),
        "names no blob": {**grid_event("in/x.mp4", "1"), "subject": "/blobServices/default/containers/videos-in"},
    }
    for why, event in refused.items():
        with pytest.raises(Unusable, match=why.split()[-1]):
            blob_created(event, CONTAINER_URL, "in/")


def test_intake_queue_needs_blob_storage_a_queue_url_and_no_sas_in_it() -> None:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        with pytest.raises(ConfigError, match="needs storage=blob"):
            watch_config.check(compose("watch", overrides=["intake=queue"]))
        with pytest.raises(ConfigError, match=r"needs storage\.queue\.url"):
            watch_config.check(compose("watch", overrides=["intake=queue", "storage=blob"]))
        with pytest.raises(ConfigError, match=r"storage\.queue\.url carries a SAS token"):
            watch_config.check(compose("watch", overrides=[
                "intake=queue", "storage=blob", "storage.queue.url='https://a.queue.core.windows.net/q?sv=1&sig=abc'"]))
        with pytest.raises(ConfigError, match="intake must be list or queue"):
            watch_config.check(compose("watch", overrides=["intake=poll"]))


# -- against Azurite -------------------------------------------------------------------------------


def queue_setup(azurite: Azurite, azurite_queue: Azurite, tag: str) -> tuple[dict[str, str], list[str], Any, Any]:
    """Blob containers and an event queue for one test, with SAS tokens scoped per area and a
    queue SAS that can read, process and update messages; returns env, overrides, the blob
    service and the queue."""
    from azure.storage.queue import QueueClient, QueueSasPermissions, generate_queue_sas

    env, overrides, service = blob_setup(azurite, tag)
    queue = QueueClient.from_connection_string(azurite_queue.connection_string, f"{tag}-events")
    queue.create_queue()
    env["MPISTYLE_QUEUE_CREDENTIAL"] = generate_queue_sas(
        "devstoreaccount1", f"{tag}-events", account_key=KEY,
        permission=QueueSasPermissions(read=True, process=True, update=True), expiry=datetime.now(UTC) + timedelta(hours=2),
    )
    overrides += ["intake=queue", f"storage.queue.url={azurite_queue.endpoint}/{tag}-events", "queue_revisit_s=0"]
    return env, overrides, service, queue


def announce(queue: Any, azurite: Azurite, container: str, name: str, etag: str | None, **how: Any) -> None:
    queue.send_message(as_queued(grid_event(name, etag, container=container, blob_endpoint=azurite.endpoint, **how)))


def upload(container: Any, name: str, data: bytes) -> str:
    """Upload (over any earlier version) and return the new version's etag, as listings give it."""
    return str(container.get_blob_client(name).upload_blob(data, overwrite=True)["etag"]).strip('"')


def listed_already(service: Any, tag: str) -> None:
    """As after an earlier tick's listing: this test's ticks read the queue alone."""
    service.get_container_client(f"{tag}-work").upload_blob(
        "intake/reconciled.json", json.dumps({"listed_at": time.time()}), overwrite=True)


def records(service: Any, tag: str) -> list[dict[str, Any]]:
    work = service.get_container_client(f"{tag}-work")
    return [json.loads(work.download_blob(b.name).readall()) for b in work.list_blobs(name_starts_with="state/")]


@pytest.mark.azurite
def test_each_upload_is_done_once_whatever_events_come_and_the_queue_ends_empty(
    azurite: Azurite, azurite_queue: Azurite, tmp_path: Path
) -> None:
    env, overrides, service, queue = queue_setup(azurite, azurite_queue, "qflow")
    listed_already(service, "qflow")
    inputs = service.get_container_client("qflow-input")
    first = upload(inputs, "clip.mp4", make_video(tmp_path / "v1.mp4", frames=8).read_bytes())
    current = upload(inputs, "clip.mp4", make_video(tmp_path / "v2.mp4", frames=6).read_bytes())
    gone = upload(inputs, "gone.mp4", b"x" * 100)
    inputs.delete_blob("gone.mp4")
    announce(queue, azurite, "qflow-input", "clip.mp4", current)
    announce(queue, azurite, "qflow-input", "clip.mp4", first)  # out of order: the older version's event after
    announce(queue, azurite, "qflow-input", "clip.mp4", current)  # Event Grid delivers at least once
    announce(queue, azurite, "qflow-input", "gone.mp4", gone)  # deleted before its event was read
    announce(queue, azurite, "qflow-input", "clip.mp4", current, kind="Microsoft.Storage.BlobDeleted")
    announce(queue, azurite, "qflow-output", "clip.mp4", current)  # another container's
    queue.send_message("this is not an event")

    done = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("started as") == 1 and "ignored" in done.stderr and "gone before its event" in done.stderr
    outputs = service.get_container_client("qflow-output")
    (tmp_path / "got.mp4").write_bytes(outputs.download_blob("clip.mp4").readall())
    assert len(decode_all(tmp_path / "got.mp4")[0]) == 6  # the current version
    done_records = [(r["input"], r["etag"], r["step"], starts(r)) for r in records(service, "qflow")]
    assert done_records == [("clip.mp4", current, "done", 1)]
    assert queue.peek_messages(max_messages=32) == []  # every message dealt with
    assert "later" not in done.stderr
    secrets = [*env.values(), KEY]
    written = everything_written(done.stderr, tmp_path, service, ["qflow-output", "qflow-work"])
    assert not [s for s in secrets if s in written]

    # Nothing left: the next tick reads no message and starts nothing.
    again = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", env=env)
    assert again.returncode == 0 and "started as" not in again.stderr, again.stderr


@pytest.mark.azurite
def test_a_video_not_final_comes_back_and_a_message_whose_watcher_kept_dying_is_quarantined(
    azurite: Azurite, azurite_queue: Azurite, tmp_path: Path
) -> None:
    env, overrides, service, queue = queue_setup(azurite, azurite_queue, "qback")
    listed_already(service, "qback")
    inputs = service.get_container_client("qback-input")
    etag = upload(inputs, "busy.mp4", make_video(tmp_path / "busy.mp4", frames=4).read_bytes())
    # Another watcher works on busy.mp4 right now (its claim's lease runs for an hour).
    key = job_name("busy.mp4", etag)
    service.get_container_client("qback-work").upload_blob(f"state/{key}.json", json.dumps({
        "input": "busy.mp4", "etag": etag, "size": 1, "key": key, "job": None, "step": "staged", "owner": "elsewhere:1",
        "lease_until": time.time() + 3600, "attempts": 0, "created": "2026-01-01T00:00:00+00:00", "history": [],
    }))
    announce(queue, azurite, "qback-input", "busy.mp4", etag)
    done = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", env=env)
    assert done.returncode == 0 and "1 busy" in done.stderr, done.stderr
    (back,) = queue.peek_messages()
    assert json.loads(back.content)["mpistyle_revisits"] == 1  # made visible again on purpose: not a lost receive

    # The other watcher is gone, and this one died three times holding the message: received,
    # never settled (max_attempts=3).
    service.get_container_client("qback-work").upload_blob(f"state/{key}.json", json.dumps({
        "input": "busy.mp4", "etag": etag, "size": 1, "key": key, "job": None, "step": "staged", "owner": "elsewhere:1",
        "lease_until": 0, "attempts": 0, "created": "2026-01-01T00:00:00+00:00", "history": [],
    }), overwrite=True)
    for _ in range(3):
        assert len(list(queue.receive_messages(visibility_timeout=1, max_messages=1))) == 1
        time.sleep(1.2)
    done = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", "max_attempts=3", env=env)
    assert done.returncode == 0 and "1 quarantined" in done.stderr, done.stderr
    (record,) = records(service, "qback")
    assert record["step"] == "quarantined" and "stopped 3 times" in record["reason"]
    assert queue.peek_messages() == [] and "started as" not in done.stderr


@pytest.mark.azurite
def test_a_listing_when_due_finds_the_uploads_no_event_announced(
    azurite: Azurite, azurite_queue: Azurite, tmp_path: Path
) -> None:
    env, overrides, service, _ = queue_setup(azurite, azurite_queue, "qlist")
    inputs = service.get_container_client("qlist-input")
    inputs.upload_blob("before.mp4", make_video(tmp_path / "a.mp4", frames=4).read_bytes())  # before the subscription
    scratch = f"workdir={tmp_path / 'scratch'}"
    first = run_watch(tmp_path, *overrides, scratch, env=env)  # the first tick lists: nothing listed yet
    assert first.returncode == 0 and "1 blob(s) listed, 1 written since" in first.stderr, first.stderr
    inputs.upload_blob("missed.mp4", make_video(tmp_path / "b.mp4", frames=4).read_bytes())  # its event lost
    quiet = run_watch(tmp_path, *overrides, scratch, env=env)  # within reconcile_every_s: no listing
    assert quiet.returncode == 0 and "reconciling" not in quiet.stderr and "started as" not in quiet.stderr
    due = run_watch(tmp_path, *overrides, scratch, "reconcile_every_s=0", env=env)
    assert due.returncode == 0 and "2 blob(s) listed" in due.stderr and due.stderr.count("started as") == 1, due.stderr
    assert sorted((r["input"], r["step"], starts(r)) for r in records(service, "qlist")) == [
        ("before.mp4", "done", 1), ("missed.mp4", "done", 1)]


@pytest.mark.azurite
def test_an_event_for_a_settings_file_carries_its_video_on_with_those_settings(
    azurite: Azurite, azurite_queue: Azurite, tmp_path: Path
) -> None:
    env, overrides, service, queue = queue_setup(azurite, azurite_queue, "qside")
    listed_already(service, "qside")
    inputs = service.get_container_client("qside-input")
    upload(inputs, "clip.mp4", make_video(tmp_path / "clip.mp4", frames=4).read_bytes())
    settings = upload(inputs, "clip.mp4.json", json.dumps({"model.style": 5}).encode())
    announce(queue, azurite, "qside-input", "clip.mp4.json", settings)  # the video's own event was lost
    done = run_watch(tmp_path, *overrides, f"workdir={tmp_path / 'scratch'}", env=env)
    assert done.returncode == 0 and done.stderr.count("started as") == 1, done.stderr
    (record,) = records(service, "qside")
    assert record["input"] == "clip.mp4" and record["step"] == "done" and record["settings"] == {"model.style": 5}
    assert queue.peek_messages() == []
