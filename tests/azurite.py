"""Azurite (the Azure Storage emulator, from the npm registry) on loopback for the tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The emulator's published development account: a well-known key, not a secret.
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteUnavailable(RuntimeError):
    pass


def _program(service: str) -> str:
    local = ROOT / ".cache" / "azurite" / "node_modules" / ".bin" / f"azurite-{service}"
    if local.exists():
        return str(local)
    found = shutil.which(f"azurite-{service}")
    if found:
        return found
    raise AzuriteUnavailable(f"azurite-{service} not found: scripts/setup.sh --test installs it with npm")


class Azurite:
    """One of the emulator's services: ``blob`` (the default) or ``queue``."""

    def __init__(self, location: Path, service: str = "blob") -> None:
        self.location = location
        self.service = service
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        endpoint = "QueueEndpoint" if self.service == "queue" else "BlobEndpoint"
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};{endpoint}={self.endpoint};"

    def start(self, timeout: float = 30) -> None:
        self.location.mkdir(parents=True, exist_ok=True)
        log = (self.location / "azurite.log").open("ab")
        command = [
            _program(self.service), f"--{self.service}Host", "127.0.0.1", f"--{self.service}Port", str(self.port),
            "--location", str(self.location),
            # --disableTelemetry: without it Azurite tries to reach an outside host.
            "--loose", "--skipApiVersionCheck", "--disableTelemetry",
        ]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AzuriteUnavailable(f"azurite exited: {(self.location / 'azurite.log').read_text()[-500:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise AzuriteUnavailable(f"azurite did not listen within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # npx/sh/node: end the whole process group.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
