"""Blob names become local paths, blob URLs and state keys only through here.

:func:`check_name` is the one set of rules every area applies to every name it is handed (with
its prefix): a name that passes means the same single object in a container and in a local
folder, so it can neither reach outside its area (``..`` in a blob URL is resolved by the HTTP
layer, into another container) nor alias another name (``a\\b`` and ``a/b``). :func:`job_name`
turns any listed name, even one that fails the rules, into a safe key, so such an input can be
refused visibly instead of breaking every tick.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

from ..errors import StorageError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 80
MAX_NAME_BYTES = 1024  # Azure's limit on a blob name
MAX_PART_BYTES = 255  # the usual file system limit on one path part (NAME_MAX)
# Control characters, line and paragraph separators: they break log lines and shell tools.
_CONTROL = ("Cc", "Zl", "Zp")
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


class UnsafeName(StorageError):
    """A name that no area accepts: it could escape the area or alias another name."""

    def __init__(self, area: str, name: str, why: str) -> None:
        super().__init__(f"unsafe name for the {area} area: {shown(name)} {why}")
        self.why = why


def shown(name: str, limit: int = 120) -> str:
    """A name fit for one log line or message: escapes visible, long ones cut."""
    text = repr(name)[1:-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if any(unicodedata.category(c) in _CONTROL for c in name):
        return "has a control character or line break"
    if any(unicodedata.category(c) == "Cs" for c in name):
        return "is not valid UTF-8"  # a local file name of undecodable bytes
    if "\\" in name:
        return "has a backslash (Windows tools and some clients read it as '/')"
    if name.startswith("/"):
        return "starts with '/'"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' part"
    if any(part.endswith(".") for part in parts):
        return "has a part ending in '.' (Windows and Azure drop trailing dots)"
    if any(len(part.encode()) > MAX_PART_BYTES for part in parts):
        return f"has a part over {MAX_PART_BYTES} bytes"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is over {MAX_NAME_BYTES} bytes"
    return None


def check_name(name: str, area: str = "storage") -> None:
    """Raise :class:`UnsafeName` unless ``name`` (prefix included) is safe in every kind of area."""
    why = _problem(name)
    if why is not None:
        raise UnsafeName(area, name, why)


def job_name(blob_name: str, etag: str) -> str:
    """A filesystem- and blob-safe id for one version of one input blob, for any name at all.

    Readable part from the name, plus a hash of the exact name and version, so "a b.mp4" and
    "a_b.mp4", or a re-upload under the same name, are different jobs.
    """
    readable = _UNSAFE.sub("_", blob_name.replace("\\", "/").split("/")[-1]).strip("._-")[:_MAX_STEM] or "video"
    # surrogatepass: a local name of undecodable bytes still hashes, to its own key.
    digest = hashlib.sha256(f"{blob_name}\0{etag}".encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{readable}-{digest}"


def is_job_key(key: str) -> bool:
    """Whether ``key`` has the shape :func:`job_name` makes (a record's file name is data too)."""
    return _KEY.fullmatch(key) is not None


def suffix_of(blob_name: str) -> str:
    """The extension to keep on the local copy (FFmpeg uses it as a hint), if a plain one."""
    last = blob_name.rsplit("/", 1)[-1]
    if "." not in last:
        return ""
    ext = "." + last.rsplit(".", 1)[-1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ""


def output_name(blob_name: str) -> str:
    """The finished video's name: the input's own name, with ``.mp4`` added unless it has it, so
    ``clip.mov`` and ``clip.mp4`` never overwrite each other's result (``x.mov`` and
    ``x.mov.mp4`` still meet: the watcher's delivery records catch that)."""
    return blob_name if blob_name.lower().endswith(".mp4") else blob_name + ".mp4"
