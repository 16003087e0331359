"""Credentials for the storage areas, and keeping them out of everything written.

A credential is read from the environment variable an area's config names (never from the
config itself), so Hydra's dumps and the job report cannot contain it. It may be a SAS token, a
connection string, or an account key; with none set, ``DefaultAzureCredential`` (managed
identity, Azure CLI login, ...) is used. The same holds for the Application Insights connection
string the watcher's metrics go to Azure Monitor with (its ``InstrumentationKey`` lets anyone
send to the resource). :func:`redact` scrubs anything secret-looking from text
that reaches a log, an error record or an exception message.
"""
from __future__ import annotations

import os
import re

_PATTERNS = [
    re.compile(r"(?i)(sig=)[^&\s\"']+"),
    re.compile(r"(?i)(AccountKey=)[^;\s\"']+"),
    re.compile(r"(?i)(SharedAccessSignature=)[^;\s\"']+"),
    re.compile(r"(?i)(InstrumentationKey=)[^;\s\"']+"),
    re.compile(r"(?i)(Authorization:\s*)\S+"),
]
_known: set[str] = set()


def remember(secret: str) -> None:
    """Add a secret value to scrub verbatim wherever it shows up."""
    if len(secret) >= 8:
        _known.add(secret)


def redact(text: str) -> str:
    for secret in _known:
        text = text.replace(secret, "<redacted>")
    for pattern in _PATTERNS:
        text = pattern.sub(r"\1<redacted>", text)
    return text


def from_env(variable: str | None) -> str | None:
    """The secret in ``variable``, remembered for redaction; None when unset or empty."""
    if not variable:
        return None
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    remember(value)
    for part in re.findall(r"(?:AccountKey|SharedAccessSignature|InstrumentationKey)=([^;]+)", value):
        remember(part)
    return value

