"""Event-driven intake (``intake=queue``): Event Grid's ``BlobCreated`` events for the input
container, delivered to an Azure Storage Queue, tell the watcher which videos arrived, so a tick
reads a few messages instead of listing the whole container and a record per blob ever uploaded.

The queue is the claim on a message: a received message stays invisible while this watcher
works on its video (:meth:`EventQueue.keeping` extends it), is deleted once the video has
reached a final state, and is otherwise made visible again after ``queue_revisit_s`` for a later
tick to carry the video on (a Slurm job still running, a retry backing off). Each such revisit
is written into the message (:func:`revisited`), so the service's dequeue count tells the
receives nobody accounted for: a watcher that died or was killed while holding it. Past
``max_attempts`` of those the message is poison and its video is quarantined.

Messages come in Event Grid's event schema, as Event Grid writes them: base64-encoded JSON
(older subscriptions wrote the JSON as it is; both are read). Duplicates, out-of-order versions
and events for blobs deleted since are expected: the event only says *which name* to look at;
the blob's current version, read from storage, is what the watcher takes.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import StorageError
from ..secrets import redact
from .areas import retrying, sdk_client

log = logging.getLogger(__name__)

BLOB_CREATED = "Microsoft.Storage.BlobCreated"
_SUBJECT = "/blobServices/default/containers/"
_MAX_MESSAGES = 32  # the most one receive call takes (the service's limit)


@dataclass
class Message:
    """One received message: its id, the receipt that deletes or updates it (renewed by each
    update), how often it was received, and its text."""

    id: str
    receipt: str
    dequeue_count: int
    text: str


@dataclass(frozen=True)
class Event:
    """What a message says, once read: the Event Grid event and how often this project's
    watchers made the message visible again on purpose."""

    event: dict[str, Any]
    revisits: int


@dataclass(frozen=True)
class BlobCreated:
    """A blob written in the input area: its name (relative to the area's prefix) and the
    version the event was about (the blob may have changed or gone since)."""

    name: str
    etag: str | None
    event_id: str


class Unusable(ValueError):
    """A message that is not an event this intake acts on; the reason, for the log."""


def read(message: Message) -> Event:
    """The event in ``message``: Event Grid's JSON, base64-encoded or not, or this module's
    wrapper around one. Raises :class:`Unusable`."""
    text = message.text.strip()
    if not text.startswith(("{", "[")):
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unusable("neither JSON nor base64-encoded JSON") from None
    try:
        found = json.loads(text)
    except ValueError:
        raise Unusable("not valid JSON") from None
    if isinstance(found, list) and len(found) == 1:  # an event array of one, as Event Grid posts them
        found = found[0]
    if not isinstance(found, dict):
        raise Unusable("not a JSON object")
    if "mpistyle_revisits" in found:
        revisits, found = found.get("mpistyle_revisits"), found.get("event")
        if not isinstance(revisits, int) or revisits < 0 or not isinstance(found, dict):
            raise Unusable("a revisit record that is not this watcher's")
        return Event(found, revisits)
    return Event(found, 0)


def revisited(event: Event) -> str:
    """The text that replaces a message made visible again on purpose: its event, with one more
    revisit counted."""
    return json.dumps({"mpistyle_revisits": event.revisits + 1, "event": event.event}, separators=(",", ":"))


def blob_created(event: dict[str, Any], container_url: str, prefix: str) -> BlobCreated:
    """The input blob a ``BlobCreated`` event names, if it is in the container at
    ``container_url`` (its account and container) under ``prefix``. Raises :class:`Unusable`
    for any other event (another type, container, account or prefix, or a malformed one)."""
    kind = event.get("eventType")
    if kind != BLOB_CREATED:
        raise Unusable(f"an event of type {str(kind)[:80]!r}, not {BLOB_CREATED}")
    subject, data = event.get("subject"), event.get("data")
    if not isinstance(subject, str) or not subject.startswith(_SUBJECT) or not isinstance(data, dict):
        raise Unusable("a BlobCreated event without a blob subject and data")
    container, marker, full_name = subject[len(_SUBJECT) :].partition("/blobs/")
    if not marker or not full_name:
        raise Unusable("a BlobCreated event whose subject names no blob")
    expected = urlparse(container_url)
    expected_path = unquote(expected.path).rstrip("/")
    if container != expected_path.rsplit("/", 1)[-1]:
        raise Unusable(f"a blob in another container ({container[:64]!r})")
    url = data.get("url")
    if isinstance(url, str):
        found = urlparse(url)
        # The account too: one queue may collect events from several storage accounts.
        if found.netloc.lower() != expected.netloc.lower() or not unquote(found.path).startswith(expected_path + "/"):
            raise Unusable("a blob in another storage account")
    if not full_name.startswith(prefix):
        raise Unusable("a blob outside the input prefix")
    etag = data.get("eTag")
    return BlobCreated(full_name[len(prefix) :], etag.strip('"') if isinstance(etag, str) else None, str(event.get("id", "")))


class EventQueue:
    """The Azure Storage Queue Event Grid delivers to (``url`` = the queue's URL), with its own
    credential: a SAS token or connection string in the environment variable
    ``credential_env``, else ``DefaultAzureCredential``."""

    label = "queue"

    def __init__(self, url: str, credential_env: str | None = None) -> None:
        from azure.storage.queue import QueueClient

        self.client = sdk_client(
            url, credential_env, "QueueEndpoint", QueueClient.from_connection_string, QueueClient.from_queue_url,
            read_timeout=60,
        )
        self._lock = threading.Lock()  # receipts change with each update, from two threads

    def receive(self, count: int, invisible_s: float) -> list[Message]:
        """Up to ``count`` messages, each hidden from other receivers for ``invisible_s``."""
        wanted = max(1, min(count, _MAX_MESSAGES))

        def take() -> list[Message]:
            got = self.client.receive_messages(messages_per_page=wanted, max_messages=wanted,
                                               visibility_timeout=_seconds(invisible_s))
            return [Message(m.id, m.pop_receipt or "", m.dequeue_count or 1, _text(m.content)) for m in got]

        return retrying(self.label, "receive messages", take)

    def delete(self, message: Message) -> bool:
        """Delete ``message``; False when this watcher no longer holds it (it became visible
        and another receive took it: that receiver deals with it)."""
        with self._lock:
            return self._while_held("delete a message", lambda: self.client.delete_message(message.id, message.receipt))

    def hide(self, message: Message, invisible_s: float, text: str | None = None) -> bool:
        """Keep ``message`` hidden for another ``invisible_s`` from now (with ``text`` as its new
        content); False when this watcher no longer holds it."""
        with self._lock:
            replies: list[Any] = []

            def update() -> None:
                replies.append(self.client.update_message(message.id, message.receipt, content=text,
                                                          visibility_timeout=_seconds(invisible_s)))

            if not self._while_held("update a message", update):
                return False
            message.receipt = replies[-1].pop_receipt
            if text is not None:
                message.text = text
        return True

    def _while_held(self, what: str, action: Callable[[], Any]) -> bool:
        """``action`` on a message this watcher received; False when its receipt no longer
        holds (the message is gone, or another receive took it since)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            retrying(self.label, what, action)
        except ResourceNotFoundError:
            return False
        except StorageError as err:
            if "PopReceiptMismatch" in str(err) or "does not match" in str(err):
                return False
            raise
        return True

    @contextmanager
    def keeping(self, invisible_s: float) -> Iterator[list[Message]]:
        """Messages put in the yielded list stay hidden while the block runs: a thread renews
        each every third of ``invisible_s`` (a download, a local job or a batch can outlast it)."""
        held: list[Message] = []
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(invisible_s / 3):
                for message in list(held):
                    try:
                        if not self.hide(message, invisible_s):
                            held.remove(message)
                    except StorageError as err:
                        log.warning("could not keep message %s hidden: %s", message.id, redact(str(err)))

        thread = threading.Thread(target=renew, daemon=True)
        thread.start()
        try:
            yield held
        finally:
            stop.set()
            thread.join()


def _seconds(value: float) -> int:
    """A visibility timeout as the service takes it: whole seconds, 0 to 7 days."""
    return max(0, min(int(value), 7 * 86400))


def _text(content: Any) -> str:
    if isinstance(content, bytes):
        return content.decode("utf-8", errors="replace")
    return str(content or "")
