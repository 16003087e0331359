"""One storage area (a blob container with a prefix, or a local folder) behind one small
interface, so the watcher does not care which it has.

State records use conditional writes: :meth:`Area.create_json` only creates (two watchers
racing for one video: exactly one wins) and :meth:`Area.replace_json` only replaces the version
the caller read (a watcher that lost its claim finds out instead of overwriting).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlparse

from ..errors import StorageError, first_line
from ..files import replacing
from ..secrets import from_env, redact
from .names import check_name, shown

log = logging.getLogger(__name__)

T = TypeVar("T")


class StateConflict(Exception):
    """Someone else changed the record since it was read: the claim is theirs now."""


@dataclass(frozen=True)
class Entry:
    name: str  # relative to the area's prefix
    etag: str
    size: int
    modified: int = 0  # last modified, ns since the epoch (blobs: whole seconds)


class Area(Protocol):
    """Every name-taking call checks the name, with the area's prefix, by
    :func:`~mpistyle.watch.names.check_name` and raises its UnsafeName (a StorageError)."""

    label: str

    def check(self, name: str) -> None: ...
    def list(self, prefix: str = "") -> list[Entry]: ...
    def version(self, name: str) -> Entry | None: ...
    def download(self, name: str, dest: Path) -> None: ...
    def upload(self, name: str, src: Path) -> None: ...
    def delete(self, name: str, etag: str | None = None) -> None: ...
    def read_json(self, name: str) -> tuple[dict[str, Any], str] | None: ...
    def create_json(self, name: str, data: dict[str, Any]) -> str | None: ...
    def replace_json(self, name: str, data: dict[str, Any], etag: str) -> str: ...


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# -- Azure Blob Storage ----------------------------------------------------------------------------


# A blob call is tried this often, pausing 2, 4, 8, ... s between tries, and not tried again once
# this long has gone by: an unreachable endpoint fails a tick in about a minute, logged as it goes.
_BLOB_TRIES = 5
_BLOB_FIRST_PAUSE_S = 2.0
_BLOB_RETRY_WINDOW_S = 90.0


def retrying(label: str, what: str, action: Callable[[], T]) -> T:
    """``action`` (a call to Azure Storage: blobs or queues), tried up to ``_BLOB_TRIES`` times
    with a doubling pause while it fails in a way that may pass (network, 5xx, 408, 429), each
    failure logged without secrets, and no new try once ``_BLOB_RETRY_WINDOW_S`` have gone by;
    then a :class:`StorageError` that names ``label`` storage and ``what`` it could not do.
    Not-found, exists and modified errors are raised as they are, for the caller to judge."""
    from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

    started = time.monotonic()
    for attempt in range(1, _BLOB_TRIES + 1):
        try:
            return action()
        except (ResourceExistsError, ResourceNotFoundError, ResourceModifiedError):
            raise
        except AzureError as err:
            reason = redact(first_line(err))
            status = getattr(err, "status_code", None)
            if status is not None and status < 500 and status != 408 and status != 429:
                raise StorageError(f"{label} storage refused to {what}: {reason}") from None
            pause = _BLOB_FIRST_PAUSE_S * 2 ** (attempt - 1)
            if attempt == _BLOB_TRIES or time.monotonic() - started + pause > _BLOB_RETRY_WINDOW_S:
                raise StorageError(
                    f"{label} storage failed to {what} after {attempt} tries in {time.monotonic() - started:.0f} s: {reason}"
                ) from None
            log.warning(
                "%s storage: could not %s (%s); try %d of %d in %.0f s", label, what, reason, attempt + 1, _BLOB_TRIES, pause
            )
            time.sleep(pause)
    raise AssertionError("unreachable")


class BlobArea:
    """A container (``url`` = container URL) and a name prefix, with its own credential."""

    def __init__(self, label: str, url: str, prefix: str = "", credential_env: str | None = None) -> None:
        from azure.storage.blob import ContainerClient

        self.label = label
        self.prefix = prefix
        self.client = sdk_client(
            url, credential_env, "BlobEndpoint", ContainerClient.from_connection_string, ContainerClient.from_container_url,
            read_timeout=120,
        )

    def _call(self, what: str, action: Callable[[], T]) -> T:
        return retrying(self.label, what, action)

    def check(self, name: str) -> None:
        check_name(self.prefix + name, self.label)

    def _full(self, name: str) -> str:
        """The blob name for ``name``, checked: the SDK puts it in a URL path, where ``..`` is
        resolved into another container's name."""
        self.check(name)
        return self.prefix + name

    def list(self, prefix: str = "") -> list[Entry]:
        """Every blob whose name starts with ``prefix``, even names the watcher will refuse."""
        from azure.core.exceptions import ResourceNotFoundError

        start = self.prefix + prefix
        try:
            blobs = self._call("list blobs", lambda: list(self.client.list_blobs(name_starts_with=start or None)))
        except ResourceNotFoundError:
            raise StorageError(f"{self.label} storage: its container does not exist (storage.{self.label}.url)") from None
        return [
            Entry(b.name[len(self.prefix) :], b.etag, b.size, _ns(b.last_modified)) for b in blobs if not b.name.endswith("/")
        ]

    def version(self, name: str) -> Entry | None:
        """The blob's current version, or None when there is none."""
        from azure.core.exceptions import ResourceNotFoundError

        blob = self.client.get_blob_client(self._full(name))
        try:
            props = self._call(f"read the properties of {name}", blob.get_blob_properties)
        except ResourceNotFoundError:
            return None
        # Unquoted, as list() gives it (the service quotes it here): the two must compare equal.
        return Entry(name, props.etag.strip('"'), props.size, _ns(props.last_modified))

    def download(self, name: str, dest: Path) -> None:
        full = self._full(name)
        with replacing(dest) as partial, partial.open("wb") as handle:

            def fetch() -> None:
                handle.seek(0)
                handle.truncate()  # a retry starts over, never after a failed try's bytes
                self.client.download_blob(full).readinto(handle)

            self._call(f"download {name}", fetch)

    def upload(self, name: str, src: Path) -> None:
        full = self._full(name)

        def put() -> None:
            with src.open("rb") as handle:
                self.client.upload_blob(full, handle, overwrite=True)

        self._call(f"upload {name}", put)

    def delete(self, name: str, etag: str | None = None) -> None:
        """Delete ``name``; with ``etag``, only that version (a re-upload since is kept)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        full = self._full(name)
        condition: dict[str, Any] = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        try:
            self._call(f"delete {name}", lambda: self.client.delete_blob(full, **condition))
        except (ResourceNotFoundError, ResourceModifiedError):
            pass

    def read_json(self, name: str) -> tuple[dict[str, Any], str] | None:
        from azure.core.exceptions import ResourceNotFoundError

        full = self._full(name)
        try:
            stream = self._call(f"read {name}", lambda: self.client.download_blob(full))
        except ResourceNotFoundError:
            return None
        return json.loads(stream.readall()), stream.properties.etag

    def create_json(self, name: str, data: dict[str, Any]) -> str | None:
        from azure.core.exceptions import ResourceExistsError

        blob = self.client.get_blob_client(self._full(name))
        try:
            reply = self._call(f"create {name}", lambda: blob.upload_blob(_dump(data), overwrite=False))
        except ResourceExistsError:
            return None
        return str(reply["etag"])

    def replace_json(self, name: str, data: dict[str, Any], etag: str) -> str:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        blob = self.client.get_blob_client(self._full(name))

        def put() -> Any:
            return blob.upload_blob(_dump(data), overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified)

        try:
            reply = self._call(f"update {name}", put)
        except (ResourceModifiedError, ResourceNotFoundError):
            raise StateConflict(name) from None
        return str(reply["etag"])


def sdk_client(
    url: str, credential_env: str | None, endpoint: str, from_connection_string: Callable[..., T],
    from_url: Callable[..., T], read_timeout: float,
) -> T:
    """An Azure SDK client of ``url`` (a container's or a queue's), signed in with what the
    variable ``credential_env`` holds: a connection string (one naming an account, or its
    ``<endpoint>=``), a SAS token, or nothing (a SAS in the URL, else ``DefaultAzureCredential``).

    No retries inside the SDK: they were silent (an unreachable endpoint gave minutes of
    nothing); the callers retry instead (:func:`retrying`), logging each try, within a bounded
    time."""
    secret = from_env(credential_env)
    options: dict[str, Any] = {"retry_total": 0, "connection_timeout": 10, "read_timeout": read_timeout}
    if secret and ("AccountName=" in secret or f"{endpoint}=" in secret):
        return from_connection_string(secret, urlparse(url).path.rstrip("/").rsplit("/", 1)[-1], **options)
    if secret:
        credential: Any = secret.lstrip("?")
    else:
        credential = None if "sig=" in url else _default_credential()
    return from_url(url, credential=credential, **options)


def _default_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise StorageError(
            "no credential: set the area's credential_env variable (SAS token or connection string), "
            "or pip install azure-identity to use a managed identity"
        ) from None
    return DefaultAzureCredential()


def _ns(when: Any) -> int:
    """A blob's last-modified time (an aware datetime) in ns since the epoch, like st_mtime_ns."""
    return int(when.timestamp()) * 1_000_000_000 if when is not None else 0


# -- a local folder ----------------------------------------------------------------------------------

# Every folder on the way to a name is opened with O_NOFOLLOW, relative to its parent's
# descriptor: a symbolic link anywhere below the root (``inbox/x.mp4 -> /etc/passwd``, or a linked
# folder) is refused, and nothing swapped in between a check and an open is followed either.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone put there returns at once (then refused) instead of hanging.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalArea:
    """A folder standing in for a container: the watcher's flow on one machine, no cloud.

    The root itself is the operator's choice and may be a link; nothing below it is followed.
    """

    def __init__(self, label: str, root: str, prefix: str = "") -> None:
        self.label = label
        self.root = Path(root).expanduser()
        # A local prefix is a folder: "in" and "in/" both mean the folder in/.
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        if self.prefix:
            check_name(self.prefix.rstrip("/"), label)
        self.root.mkdir(parents=True, exist_ok=True)

    def check(self, name: str) -> None:
        check_name(self.prefix + name, self.label)

    def _parts(self, name: str) -> list[str]:
        self.check(name)
        return (self.prefix + name).split("/")

    @contextmanager
    def _folder(self, parts: list[str], name: str, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder that holds ``parts[-1]``, reached without following links.
        A missing folder raises FileNotFoundError (unless ``create``)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                child = self._open_at(fd, part, _FOLDER_FLAGS, name)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _refused(self, err: OSError, name: str, what: str = "use") -> StorageError:
        if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            return StorageError(
                f"local {self.label} folder: {redact(shown(self.prefix + name))} is a symbolic link or goes through one "
                "(local areas never follow links): replace it with the file itself"
            )
        return StorageError(f"cannot {what} {redact(shown(self.prefix + name))} in the local {self.label} folder: {err.strerror}")

    def _open_at(self, folder: int, part: str, flags: int, name: str, what: str = "use") -> int:
        """``os.open`` of ``part`` in ``folder``: FileNotFoundError passes, any other error (a
        link met with O_NOFOLLOW among them) is refused."""
        try:
            return os.open(part, flags, dir_fd=folder)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise self._refused(err, name, what) from None

    def _open_file(self, folder: int, part: str, name: str) -> int:
        """A descriptor of the regular file ``part`` in ``folder`` (FileNotFoundError if none)."""
        fd = self._open_at(folder, part, _READ_FLAGS, name, "read")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(f"local {self.label} folder: {redact(shown(self.prefix + name))} is not a regular file")
        return fd

    def _open(self, name: str) -> int:
        """A descriptor of the regular file ``name``, reached without following links
        (FileNotFoundError if there is none)."""
        parts = self._parts(name)
        with self._folder(parts, name) as folder:
            return self._open_file(folder, parts[-1], name)

    def _read(self, name: str) -> bytes | None:
        try:
            fd = self._open(name)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def list(self, prefix: str = "") -> list[Entry]:
        """Regular files under ``prefix`` (a folder, e.g. ``state/``); links are skipped, with a
        warning, and so are hidden files and files being written (not there yet)."""
        base = self.prefix + prefix
        parts = base.rstrip("/").split("/") if base else []
        if parts:
            check_name("/".join(parts), self.label)
        try:
            with self._folder([*parts, ""], base) as folder:
                return sorted(self._walk(folder, prefix), key=lambda e: e.name)
        except FileNotFoundError:
            return []

    def _walk(self, folder: int, relative: str) -> Iterator[Entry]:
        with os.scandir(folder) as found:
            items = sorted(found, key=lambda item: item.name)
        for item in items:
            name = relative + item.name
            if item.name.startswith(".") or ".partial" in item.name:
                continue
            try:
                info = item.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    log.warning("local %s folder: skipping the symbolic link %s (local areas never follow links)",
                                self.label, redact(shown(self.prefix + name)))
                elif stat.S_ISDIR(info.st_mode):
                    child = os.open(item.name, _FOLDER_FLAGS, dir_fd=folder)
                    try:
                        yield from self._walk(child, name + "/")
                    finally:
                        os.close(child)
                elif stat.S_ISREG(info.st_mode):
                    yield Entry(name, _local_etag(info), info.st_size, info.st_mtime_ns)
            except FileNotFoundError:
                continue  # removed while listing
            except OSError as err:
                log.warning("local %s folder: skipping %s: %s", self.label, redact(shown(self.prefix + name)), err.strerror)

    def version(self, name: str) -> Entry | None:
        parts = self._parts(name)
        try:
            with self._folder(parts, name) as folder:
                info = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except StorageError:
            return None  # under a linked folder: not an input this area lists
        if not stat.S_ISREG(info.st_mode):
            return None
        return Entry(name, _local_etag(info), info.st_size, info.st_mtime_ns)

    def download(self, name: str, dest: Path) -> None:
        try:
            fd = self._open(name)
        except FileNotFoundError:
            raise StorageError(f"{redact(shown(self.prefix + name))} is gone from the local {self.label} folder") from None
        with os.fdopen(fd, "rb") as source, replacing(dest) as partial, partial.open("wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)

    def upload(self, name: str, src: Path) -> None:
        parts = self._parts(name)

        def fill(handle: BinaryIO) -> None:
            with src.open("rb") as source:
                shutil.copyfileobj(source, handle, 1 << 20)

        with self._folder(parts, name, create=True) as folder:
            self._write(folder, parts[-1], name, fill)

    def delete(self, name: str, etag: str | None = None) -> None:
        parts = self._parts(name)
        try:
            with self._folder(parts, name) as folder:
                if etag is not None and _local_etag(os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)) != etag:
                    return  # replaced since: that is a new job's input
                os.unlink(parts[-1], dir_fd=folder)
        except FileNotFoundError:
            pass

    def read_json(self, name: str) -> tuple[dict[str, Any], str] | None:
        raw = self._read(name)
        if raw is None:
            return None
        return json.loads(raw), _digest(raw)

    def create_json(self, name: str, data: dict[str, Any]) -> str | None:
        parts = self._parts(name)
        raw = _dump(data)
        with self._folder(parts, name, create=True) as folder, self._locked(folder, parts[-1]):
            try:
                os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
                return None
            except FileNotFoundError:
                pass
            self._write(folder, parts[-1], name, lambda handle: handle.write(raw))
        return _digest(raw)

    def replace_json(self, name: str, data: dict[str, Any], etag: str) -> str:
        parts = self._parts(name)
        raw = _dump(data)
        try:
            with self._folder(parts, name) as folder, self._locked(folder, parts[-1]):
                fd = self._open_file(folder, parts[-1], name)
                with os.fdopen(fd, "rb") as handle:
                    if _digest(handle.read()) != etag:
                        raise StateConflict(name)
                self._write(folder, parts[-1], name, lambda handle: handle.write(raw))
        except FileNotFoundError:
            raise StateConflict(name) from None
        return _digest(raw)

    def _write(self, folder: int, part: str, name: str, fill: Callable[[BinaryIO], object]) -> None:
        """Readers see the old file or the whole new one. The partial file's name is short (a
        255-byte name plus a suffix would not fit) and hidden from :meth:`list`. Not
        :func:`mpistyle.files.replacing`: that works on paths, and this must stay relative to
        ``folder``, reached without following links."""
        partial = f".{_short(part)}.partial-{os.getpid()}"
        try:
            fd = os.open(partial, _WRITE_FLAGS, 0o666, dir_fd=folder)
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
            # Renames the entry itself: a link already at the target is replaced, never followed.
            os.replace(partial, part, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError as err:
            with suppress(OSError):
                os.unlink(partial, dir_fd=folder)
            raise self._refused(err, name, "write") from None

    @staticmethod
    @contextmanager
    def _locked(folder: int, part: str) -> Iterator[None]:
        """An exclusive lock beside the record, held while it is compared and replaced."""
        lock = f".{_short(part)}.lock"  # short, like the partial files
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _digest(raw: bytes) -> str:
    """A local record's version: the SHA-256 of its bytes."""
    return hashlib.sha256(raw).hexdigest()


def _short(part: str) -> str:
    """A short stand-in for a file name, for the hidden files beside it (a 255-byte name plus
    a suffix would not fit)."""
    return hashlib.sha256(part.encode()).hexdigest()[:16]


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
