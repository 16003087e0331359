"""One storage area (a blob container with a prefix, or a local folder) behind one small
interface, so the watcher does not care which it has.

State records use conditional writes: :meth:`Area.create_json` only creates (two watchers
racing for one video: exactly one wins) and :meth:`Area.replace_json` only replaces the version
the caller read (a watcher that lost its claim finds out instead of overwriting).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from ..errors import StorageError
from .secrets import from_env, redact

T = TypeVar("T")


class StateConflict(Exception):
    """Someone else changed the record since it was read: the claim is theirs now."""


@dataclass(frozen=True)
class Entry:
    name: str  # relative to the area's prefix
    etag: str
    size: int


class Area(Protocol):
    label: str

    def list(self) -> list[Entry]: ...
    def download(self, name: str, dest: Path) -> None: ...
    def upload(self, name: str, src: Path) -> None: ...
    def delete(self, name: str, etag: str | None = None) -> None: ...
    def read_json(self, name: str) -> tuple[dict[str, Any], str] | None: ...
    def create_json(self, name: str, data: dict[str, Any]) -> str | None: ...
    def replace_json(self, name: str, data: dict[str, Any], etag: str) -> str: ...


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# -- Azure Blob Storage ----------------------------------------------------------------------------


class BlobArea:
    """A container (``url`` = container URL) and a name prefix, with its own credential."""

    def __init__(self, label: str, url: str, prefix: str = "", credential_env: str | None = None, retries: int = 5) -> None:
        from azure.storage.blob import ContainerClient

        self.label = label
        self.prefix = prefix
        self.retries = retries
        secret = from_env(credential_env)
        options = {"retry_total": retries, "connection_timeout": 20, "read_timeout": 120}
        if secret and ("AccountName=" in secret or "BlobEndpoint=" in secret):
            container = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
            self.client = ContainerClient.from_connection_string(secret, container, **options)
        else:
            credential: Any = secret.lstrip("?") if secret else None
            if credential is None and "sig=" not in url:
                credential = _default_credential()
            self.client = ContainerClient.from_container_url(url, credential=credential, **options)

    def _call(self, what: str, action: Callable[[], T]) -> T:
        """The SDK already retries transient errors with backoff; this adds a last, slower round
        for the errors that outlast it, and a message without secrets."""
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        for attempt in range(3):
            try:
                return action()
            except (ResourceExistsError, ResourceNotFoundError, ResourceModifiedError):
                raise
            except AzureError as err:
                status = getattr(err, "status_code", None)
                if status is not None and status < 500 and status != 408 and status != 429:
                    raise StorageError(f"{self.label} storage refused to {what}: {redact(_first_line(err))}") from None
                if attempt == 2:
                    raise StorageError(f"{self.label} storage failed to {what}: {redact(_first_line(err))}") from None
                time.sleep(2.0 * 2**attempt)
        raise AssertionError("unreachable")

    def list(self) -> list[Entry]:
        blobs = self._call("list blobs", lambda: list(self.client.list_blobs(name_starts_with=self.prefix or None)))
        return [Entry(b.name[len(self.prefix) :], b.etag, b.size) for b in blobs if not b.name.endswith("/")]

    def download(self, name: str, dest: Path) -> None:
        partial = dest.with_name(dest.name + ".partial")
        with partial.open("wb") as handle:

            def fetch() -> None:
                handle.seek(0)
                handle.truncate()  # a retry starts over, never after a failed try's bytes
                self.client.download_blob(self.prefix + name).readinto(handle)

            self._call(f"download {name}", fetch)
        os.replace(partial, dest)

    def upload(self, name: str, src: Path) -> None:
        def put() -> None:
            with src.open("rb") as handle:
                self.client.upload_blob(self.prefix + name, handle, overwrite=True)

        self._call(f"upload {name}", put)

    def delete(self, name: str, etag: str | None = None) -> None:
        """Delete ``name``; with ``etag``, only that version (a re-upload since is kept)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        condition = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        try:
            self._call(f"delete {name}", lambda: self.client.delete_blob(self.prefix + name, **condition))
        except (ResourceNotFoundError, ResourceModifiedError):
            pass

    def read_json(self, name: str) -> tuple[dict[str, Any], str] | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            stream = self._call(f"read {name}", lambda: self.client.download_blob(self.prefix + name))
        except ResourceNotFoundError:
            return None
        return json.loads(stream.readall()), stream.properties.etag

    def create_json(self, name: str, data: dict[str, Any]) -> str | None:
        from azure.core.exceptions import ResourceExistsError

        blob = self.client.get_blob_client(self.prefix + name)
        try:
            reply = self._call(f"create {name}", lambda: blob.upload_blob(_dump(data), overwrite=False))
        except ResourceExistsError:
            return None
        return str(reply["etag"])

    def replace_json(self, name: str, data: dict[str, Any], etag: str) -> str:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        blob = self.client.get_blob_client(self.prefix + name)

        def put() -> Any:
            return blob.upload_blob(_dump(data), overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified)

        try:
            reply = self._call(f"update {name}", put)
        except (ResourceModifiedError, ResourceNotFoundError):
            raise StateConflict(name) from None
        return str(reply["etag"])


def _default_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise StorageError(
            "no credential: set the area's credential_env variable (SAS token or connection string), "
            "or pip install azure-identity to use a managed identity"
        ) from None
    return DefaultAzureCredential()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- a local folder ----------------------------------------------------------------------------------


class LocalArea:
    """A folder standing in for a container: the watcher's flow on one machine, no cloud."""

    def __init__(self, label: str, root: str, prefix: str = "") -> None:
        self.label = label
        self.root = Path(root).expanduser()
        self.prefix = prefix
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        full = self.prefix + name
        parts = full.replace("\\", "/").split("/")
        if full.startswith("/") or any(p in ("..", "") for p in parts) or any(unicodedata.category(c) == "Cc" for c in full):
            raise StorageError(f"unsafe name for a local {self.label} folder: {full!r}")
        return self.root.joinpath(*parts)

    def list(self) -> list[Entry]:
        base = self.root / self.prefix if self.prefix else self.root
        if not base.is_dir():
            return []
        entries = []
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(base).as_posix()
            # Files being written (ours or another copier's) are not there yet.
            if path.is_file() and not any(part.startswith(".") for part in relative.split("/")) and ".partial" not in path.name:
                stat = path.stat()
                entries.append(Entry(relative, _local_etag(stat), stat.st_size))
        return entries

    def download(self, name: str, dest: Path) -> None:
        partial = dest.with_name(dest.name + ".partial")
        shutil.copyfile(self._path(name), partial)
        os.replace(partial, dest)

    def upload(self, name: str, src: Path) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.copyfile(src, partial)
        os.replace(partial, target)

    def delete(self, name: str, etag: str | None = None) -> None:
        path = self._path(name)
        try:
            if etag is not None and _local_etag(path.stat()) != etag:
                return  # replaced since: that is a new job's input
            path.unlink()
        except FileNotFoundError:
            pass

    def read_json(self, name: str) -> tuple[dict[str, Any], str] | None:
        path = self._path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return json.loads(raw), hashlib.sha256(raw).hexdigest()

    def create_json(self, name: str, data: dict[str, Any]) -> str | None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = _dump(data)
        with self._locked(path):
            if path.exists():
                return None
            self._write(path, raw)
        return hashlib.sha256(raw).hexdigest()

    def replace_json(self, name: str, data: dict[str, Any], etag: str) -> str:
        path = self._path(name)
        raw = _dump(data)
        with self._locked(path):
            try:
                current = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                raise StateConflict(name) from None
            if current != etag:
                raise StateConflict(name)
            self._write(path, raw)
        return hashlib.sha256(raw).hexdigest()

    @staticmethod
    def _write(path: Path, raw: bytes) -> None:
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_bytes(raw)
        os.replace(partial, path)

    class _locked:
        """An exclusive lock beside the record, held while it is compared and replaced."""

        def __init__(self, path: Path) -> None:
            self.lock = path.with_name(f".{path.name}.lock")

        def __enter__(self) -> None:
            self.handle = self.lock.open("a")
            fcntl.flock(self.handle, fcntl.LOCK_EX)

        def __exit__(self, *exc: object) -> None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _local_etag(stat: os.stat_result) -> str:
    """A local file's version: it changes whenever the file is replaced or rewritten."""
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


def open_area(label: str, cfg: Any) -> Area:
    """An area from its config node: ``kind`` blob (url, prefix, credential_env) or local (root, prefix)."""
    if cfg.kind == "blob":
        if not cfg.url:
            raise StorageError(f"storage.{label}.url is not set (the container URL)")
        return BlobArea(label, cfg.url, cfg.prefix or "", cfg.credential_env)
    if cfg.kind == "local":
        if not cfg.root:
            raise StorageError(f"storage.{label}.root is not set (a folder)")
        return LocalArea(label, cfg.root, cfg.prefix or "")
    raise StorageError(f"storage.{label}.kind must be blob or local, not {cfg.kind!r}")
