"""SHA-256 of the files a set of real jobs writes, to show a refactor changed no output byte.

    .venv/bin/python scripts/output_checksums.py --write bench/results/output-checksums-<commit>.json
    .venv/bin/python scripts/output_checksums.py --check bench/results/output-checksums-<commit>.json

Each case runs the real program (under `mpirun` where it has several ranks) on a clip made
here, and records the output's digest and the shape of its job report (every key path, not the
timings). Digests hold on one machine: the model's floating point differs between CPUs, so
compare runs made on the same machine (the file records which), with the same input clips: x264
encodes the clips made here differently from one run to the next (its AVX-512 code at widths
that are not a multiple of 128), so they are made once into ``--inputs`` and reused, and their
digests are recorded too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from mpistyle.model.transformer_net import TransformerNet
from mpistyle.sample import make_video

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def _damaged(folder: Path) -> Path:
    """A clip whose third keyframe is garbage after its first bytes (decoded with concealment)."""
    source = make_video(folder / "clean.mp4", frames=24, gop=6, width=96, height=54, audio=0)
    with av.open(str(source)) as container:
        keys = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size and p.is_keyframe]
    position, size = keys[2]
    data = bytearray(source.read_bytes())
    data[position + 12 : position + size] = bytes([0xFF]) * (size - 12)
    (folder / "damaged.mp4").write_bytes(bytes(data))
    return folder / "damaged.mp4"


def _painting(folder: Path) -> Path:
    rgb = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    path = folder / "painting.png"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 40, 40, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            out.mux(packet)
    return path


def _checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "net.pth"
    torch.save(TransformerNet().state_dict(), path)
    return path


# Every case runs eager fp32: the speed defaults (precision=auto, compile=auto) depend on the CPU
# and the clip's size, and a record must hold wherever the check runs on the same machine.
PINNED = ["precision=fp32", "compile=false"]

# name -> (ranks, input maker, output name, extra overrides)
CASES: dict[str, tuple[int, Callable[[Path], Path], str, list[str]]] = {
    "default-2ranks-mp4": (2, lambda d: make_video(d / "in.mp4", frames=36, width=96, height=64, gop=6), "out.mp4", []),
    "temporal-3ranks-mkv": (
        3,
        lambda d: make_video(d / "in.mp4", frames=30, width=80, height=48, gop=5, fps=10),
        "out.mkv",
        ["temporal.alpha=0.5", "temporal.measure=true", "video.segment_seconds=0"],
    ),
    "overlap-2ranks-mov-2audio": (
        2,
        lambda d: make_video(d / "in.mov", frames=24, width=64, height=48, gop=4, audio=2, keyframes=[0, 4, 11, 19]),
        "out.mov",
        ["overlap=true", "video.segment_seconds=0.5"],
    ),
    "damaged-conceal-2ranks": (2, _damaged, "out.mp4", ["video.segment_seconds=0", "on_damage=conceal"]),
    "blend-2ranks": (
        2,
        lambda d: make_video(d / "in.mp4", frames=18, width=64, height=48, gop=6),
        "out.mp4",
        ["model=multistyle", "model.blend={3: 0.5, 19: 0.5}"],
    ),
    "arbitrary-1rank": (
        1,
        lambda d: make_video(d / "in.mp4", frames=12, width=64, height=48, gop=6),
        "out.mp4",
        ["model=arbitrary", "model.style_image={painting}"],
    ),
    "transformer-net-2ranks-mkv": (
        2,
        lambda d: make_video(d / "in.mkv", frames=16, width=64, height=48, gop=8),
        "out.mkv",
        ["model=transformer_net", "model.checkpoint={checkpoint}"],
    ),
}


def _key_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _key_paths(item, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _key_paths(value[0], f"{prefix}[]")
    return [prefix]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fill(override: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        override = override.replace("{" + name + "}", str(path))
    return override


def _inputs(name: str, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The case's input clip and files, made on the first run and reused after."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "inputs.json"
    if not done.exists():
        made = {"source": CASES[name][1](folder), "painting": _painting(folder), "checkpoint": _checkpoint(folder)}
        done.write_text(json.dumps({key: path.name for key, path in made.items()}))
    names = json.loads(done.read_text())
    return folder / names.pop("source"), {key: folder / value for key, value in names.items()}


def run_case(name: str, folder: Path, inputs: Path) -> dict[str, Any]:
    ranks, _, output_name, overrides = CASES[name]
    folder.mkdir()
    source, files = _inputs(name, inputs / name)
    output = folder / output_name
    args = [f"input={source}", f"output={output}", *PINNED, *[_fill(o, files) for o in overrides]]
    command = [sys.executable, "-m", "mpistyle", *args]
    if ranks > 1:
        command = [shutil.which("mpirun") or "mpirun", "-n", str(ranks), *command]
    done = subprocess.run(command, cwd=folder, env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    report = json.loads(output.with_name(f"{output.name}.report.json").read_text())
    return {
        "input_sha256": _digest(source),
        "output_sha256": _digest(output),
        "preview_sha256": _digest(output.with_name(f"{output.name}.preview.png")),
        "report_keys": sorted(_key_paths(report)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="record the digests in this JSON file")
    group.add_argument("--check", type=Path, help="compare with the digests recorded in this JSON file")
    parser.add_argument("--inputs", type=Path, default=Path(".cache/output-checksums"), help="where the input clips are kept")
    parser.add_argument("cases", nargs="*", default=list(CASES), help="cases to run (default: all)")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mpistyle-checksums-") as tmp:
        for name in args.cases:
            results[name] = run_case(name, Path(tmp) / name, args.inputs.absolute())
            print(f"{name}: {results[name]['output_sha256'][:16]}", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "av": av.__version__}
    if args.write:
        args.write.write_text(json.dumps({"machine": machine, "cases": results}, indent=1) + "\n")
        return 0
    recorded = json.loads(args.check.read_text())["cases"]
    failed = 0
    for name, result in results.items():
        for field, value in result.items():
            if recorded[name][field] != value:
                failed += 1
                print(f"DIFFERS {name} {field}: {recorded[name][field]} != {value}")
    print("all the same" if not failed else f"{failed} difference(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
