"""Blob names become local paths and state keys only through here: no ``..``, no absolute
paths, no control characters, and two different names never map to the same place."""
from __future__ import annotations

import hashlib
import re
import unicodedata

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 80


def job_name(blob_name: str, etag: str) -> str:
    """A filesystem- and blob-safe id for one version of one input blob.

    Readable part from the name, plus a hash of the exact name and version, so "a b.mp4" and
    "a_b.mp4", or a re-upload under the same name, are different jobs.
    """
    if not blob_name or any(unicodedata.category(c) == "Cc" for c in blob_name):
        raise ValueError(f"refusing blob name with control characters or empty: {blob_name!r}")
    readable = _UNSAFE.sub("_", blob_name.replace("\\", "/").split("/")[-1]).strip("._-")[:_MAX_STEM] or "video"
    digest = hashlib.sha256(f"{blob_name}\0{etag}".encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def suffix_of(blob_name: str) -> str:
    """The extension to keep on the local copy (FFmpeg uses it as a hint), if a plain one."""
    last = blob_name.rsplit("/", 1)[-1]
    if "." not in last:
        return ""
    ext = "." + last.rsplit(".", 1)[-1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ""


def output_name(blob_name: str) -> str:
    """The finished video's name: the input's own name, with ``.mp4`` added unless it has it, so
    ``clip.mov`` and ``clip.mp4`` never overwrite each other's result."""
    return blob_name if blob_name.lower().endswith(".mp4") else blob_name + ".mp4"
