"""The staging key names an input by its contents: a copy with another time stamp (a watcher's
re-download) reuses the staged segments, an edit in place does not."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from mpistyle.files import fingerprint
from mpistyle.pipeline import run

Cfg = Callable[..., DictConfig]


def test_a_fresh_copy_of_the_same_input_reuses_its_staged_segments(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    source = video(frames=8)
    first = run(cfg(f"input={source}", f"output={tmp_path / 'a.mp4'}", "staging.keep=true"))
    assert first["frames_reused"] == 0
    # As a watcher's re-download leaves it: the same bytes in a new file, another time stamp.
    copy = tmp_path / "copy.mp4"
    shutil.copyfile(source, copy)
    os.replace(copy, source)
    os.utime(source, ns=(1, 1))
    again = run(cfg(f"input={source}", f"output={tmp_path / 'b.mp4'}"))
    assert again["frames_reused"] == 8


def test_the_same_size_with_other_bytes_is_another_input(tmp_path: Path) -> None:
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    # Only a byte in the middle differs: neither the size nor the first and last MiB tell.
    data = bytearray(os.urandom(3 << 20))
    one.write_bytes(bytes(data))
    data[len(data) // 2] ^= 0xFF
    two.write_bytes(bytes(data))
    stat = one.stat()
    os.utime(two, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(one) != fingerprint(two)
    assert fingerprint(one) == fingerprint(one)
