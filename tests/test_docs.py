"""The docs as executable documentation: every command in a command block of README.md,
cyclecloud/README.md and docs/*.md, and every inline command and Hydra override in their text,
runs here as written, on tiny inputs, on the real MPI, Slurm and files the suite uses.

A command added to the docs is run without anyone adding a test for it. One that cannot run
here says why in the docs themselves, in its trailing comment: ``(not run by the tests: why)``;
the reasons allowed are few (below). What the harness changes, and only this:
- commands run in a sandbox folder holding the files the docs name (``in.mp4``, ``candy.pth``,
  ``painting.jpg``, ``photos/``, ...: tiny real files), and ``/shared/`` (the cluster's shared
  filesystem in the docs) is the sandbox's ``shared/``;
- ``mpistyle-train`` gets ``steps=2`` and tiny crops appended (later overrides win), since its
  documented recipes take minutes to hours;
- ``mpistyle-sample`` gets ``--seconds 1 --size 160x90`` appended (later options win): the
  sandbox's clips stay tiny for the commands after it, which read the clip it writes;
- ``sbatch`` goes to the suite's single-node Slurm (with ``--nodes=``, to its cluster of four
  nodes), and the job must complete.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from mpistyle.model.transformer_net import TransformerNet
from mpistyle.sample import make_video
from slurm_cluster import SlurmCluster

from conftest import MPI_ENV, TESTS

ROOT = TESTS.parent
DOCS = [ROOT / "README.md", ROOT / "cyclecloud" / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
NOT_RUN = re.compile(r"\(not run by the tests: ([^)]*)\)")
# Why a command may be left out: what this machine lacks, or what runs elsewhere.
ALLOWED_REASONS = (
    "needs Azure", "needs a GPU", "CI runs it", "takes 10 minutes", "installs system packages",
    "fetches wheels for the GPU machine",
)
PROGRAMS = ("mpistyle", "mpistyle-train", "mpistyle-watch", "mpistyle-sample", "mpirun", "sbatch", "python", "./scripts/")
TINY_SAMPLE = ["--seconds", "1", "--size", "160x90"]
TINY_TRAINING = ["steps=2", "image_size=32", "batch_size=1", "log_every=1", "sample_every=0", "checkpoint_every=2"]


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # as written (continuation lines joined)
    not_run: str | None  # the reason the docs give

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def _blocks(text: str) -> Iterator[tuple[int, str, str, str | None]]:
    """(first line number, info string, body, the reason none of it is run) of each fenced
    block; the reason is given on the last line of text before it, for the whole block."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        yield text[: match.start()].count("\n") + 2, match.group(1), match.group(2), reason.group(1) if reason else None


def block_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for first, info, body, block_reason in _blocks(text):
            if info not in ("", "sh", "bash", "shell"):
                continue  # output (text), configuration (yaml, ini): not commands
            pending, start = "", 0
            for number, line in enumerate(body.splitlines(), first):
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                start = start if pending else number
                pending += line.rstrip()
                if pending.endswith("\\"):
                    pending = pending[:-1] + " "
                    continue
                reason = NOT_RUN.search(pending)
                not_run = reason.group(1) if reason else block_reason
                commands.append(Command(str(doc.relative_to(ROOT)), start, pending, not_run))
                pending = ""
            assert not pending, f"{doc}:{start}: a command block ends inside a continued line"
    return commands


def inline_spans() -> list[tuple[str, int, str]]:
    """(doc, line, span) for every inline code span outside the blocks."""
    spans = []
    for doc in DOCS:
        # Blocks blanked out line for line, so the line numbers stay.
        prose = re.sub(r"^```.*?^```$", lambda m: "\n" * m.group(0).count("\n"), doc.read_text(), flags=re.S | re.M)
        # A span may wrap onto the next line of the paragraph: its words are joined with one space.
        for match in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
            span = " ".join(match.group(1).split())
            spans.append((str(doc.relative_to(ROOT)), prose[: match.start()].count("\n") + 1, span))
    return spans


def inline_commands() -> list[Command]:
    """Inline spans that are whole commands: a program and at least one argument of its own."""
    found = []
    for doc, line, span in inline_spans():
        words = span.split()
        program = words[3] if words[:1] == ["mpirun"] and len(words) > 3 else words[0] if words else ""
        if len(words) > 1 and program in PROGRAMS[:4] and any("=" in word or word.startswith("-") for word in words[1:]):
            found.append(Command(doc, line, span, None))
    return found


def inline_overrides() -> list[str]:
    """Inline spans that are Hydra overrides (``key=value``, ``+key=value``), placeholders aside:
    a value in capitals (``threads=N``, ``model.checkpoint=PATH``) or ``key=value`` itself."""
    found = []
    for _, _, span in inline_spans():
        words = span.split()
        if not words or not all(re.match(r"^[+~]{0,2}[a-z_][\w.]*=[^=\s]", word) for word in words):
            continue
        if any(re.search(r"=([A-Z_]+|\.\.\.)$", word) for word in words) or span == "key=value":
            continue
        found.append(span)
    return list(dict.fromkeys(found))


COMMANDS = block_commands() + inline_commands()
# The README's first two commands set a machine up (apt, pip, npm): CI runs the second as
# written (.ci/run); the job of the first is scripts/demo.sh, run below.
SETUP = COMMANDS[:2]
RUN = [c for c in COMMANDS[2:] if c.not_run is None]


def test_the_docs_hold_commands_and_say_why_any_is_not_run() -> None:
    assert len(COMMANDS) >= 20 and len(inline_overrides()) >= 20
    for command in COMMANDS:
        if command.not_run is not None:
            assert command.not_run.startswith(ALLOWED_REASONS), f"{command}: {command.not_run}"
    # The README's first two commands: .ci/run runs the second as written; the first's job is below.
    assert [c.text for c in SETUP] == [
        "./scripts/setup.sh && ./scripts/demo.sh",
        "./scripts/setup.sh --test && ./scripts/test.sh",
    ]
    assert [c.doc for c in SETUP] == ["README.md"] * 2
    assert SETUP[1].text in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("override", inline_overrides())
def test_every_inline_override_is_accepted(override: str) -> None:
    """Each composes on mpistyle's, mpistyle-train's or mpistyle-watch's config (with a model
    group where it belongs to one)."""
    from mpistyle import config
    from mpistyle.train import config as train_config
    from mpistyle.watch import config as watch_config

    config.register()
    train_config.register()
    watch_config.register()
    words = override.split()
    tries = [("config", []), ("train", []), ("watch", [])]
    tries += [("config", [f"model={group.stem}"]) for group in sorted((ROOT / "configs" / "model").glob("*.yaml"))]
    errors = []
    for name, extra in tries:
        try:
            with initialize_config_module("mpistyle.configs", version_base="1.3"):
                compose(name, overrides=[*extra, *words])
            return
        except Exception as err:  # Hydra's many error types
            errors.append(f"{name} {extra}: {str(err).splitlines()[0]}")
    pytest.fail(f"{override} is refused everywhere: {errors}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding every file the docs' commands name, each tiny and real."""
    folder = tmp_path_factory.mktemp("docs")
    names = ("in.mp4", "in.mov", "in.mkv", "clip.mp4", "my clip (1).mov", "shared/in.mp4", "inbox/holiday.mp4",
             "videos/a.mp4", "videos/b.mov")
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        make_video(folder / name, frames=8, width=64, height=48, gop=4)
    torch.manual_seed(0)
    for name in ("candy.pth", "mystyle.pth"):  # pytorch/examples' format: a TransformerNet state dict
        torch.save(TransformerNet().state_dict(), folder / name)
    torch.jit.script(_Invert()).save(str(folder / "my_model.pt"))
    pictures = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), np.uint8)
    cv2.imwrite(str(folder / "painting.jpg"), pictures[0])
    (folder / "photos").mkdir()
    for number, picture in enumerate(pictures[1:]):
        cv2.imwrite(str(folder / "photos" / f"photo{number}.jpg"), picture)
    (folder / "my_package.py").write_text(
        "import torch\n\n\n"
        "class Brighter(torch.nn.Module):\n"
        "    def __init__(self, strength: float) -> None:\n"
        "        super().__init__()\n"
        "        self.strength = strength\n\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        return x + self.strength * (1 - x)\n\n\n"
        "def build_model(strength: float = 0.5) -> torch.nn.Module:\n"
        "    return Brighter(strength)\n"
    )
    (folder / "list.txt").write_text("videos/a.mp4\nvideos/b.mov\n")
    (folder / "jobs.jsonl").write_text('{"input": "in.mp4", "output": "styled/in-5.mp4", "model.style": 5}\n')
    (folder / "slurm").symlink_to(ROOT / "slurm")
    (folder / "scripts").symlink_to(ROOT / "scripts")
    (folder / "bench").symlink_to(ROOT / "bench")
    return folder


class _Invert(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - x


def _environment(sandbox: Path) -> dict[str, str]:
    venv = Path(sys.executable).parent
    return {
        **os.environ,
        **MPI_ENV,
        "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(sandbox), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "MPISTYLE_PYTHON": sys.executable,
    }


def _as_run_here(text: str, sandbox: Path) -> str:
    text = text.replace("/shared/", f"{sandbox}/shared/")
    if re.search(r"(^|\s)mpistyle-train\s", text):
        text = shlex.join([*shlex.split(text, comments=True), *TINY_TRAINING])
    elif re.search(r"(^|\s)mpistyle-sample\s", text):
        text = shlex.join([*shlex.split(text, comments=True), *TINY_SAMPLE])
    return text


def test_the_first_command_s_job_runs() -> None:
    done = subprocess.run([str(ROOT / "scripts" / "demo.sh")], env={**os.environ, **MPI_ENV}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo: styled video" in done.stdout and (ROOT / "demo" / "sample-styled.mp4").exists()


def _submits(command: Command) -> bool:
    return "sbatch" in shlex.split(command.text, comments=True)


@pytest.mark.parametrize("command", [c for c in RUN if not _submits(c)], ids=str)
def test_the_command_runs_as_written(command: Command, sandbox: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", _as_run_here(command.text, sandbox)],
        cwd=sandbox, env=_environment(sandbox), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"{command}: {command.text}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slurm
@pytest.mark.parametrize("command", [c for c in RUN if _submits(c)], ids=str)
def test_the_sbatch_command_runs_as_written(command: Command, sandbox: Path, request: pytest.FixtureRequest) -> None:
    # A job for several nodes goes to the multi-node cluster (tests/slurm_nodes.py).
    slurm: SlurmCluster = request.getfixturevalue("nodes" if "--nodes=" in command.text else "slurm")
    env = {**_environment(sandbox), **slurm.env()}
    done = subprocess.run(["bash", "-c", _as_run_here(command.text, sandbox)], cwd=sandbox, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job = int(done.stdout.split()[-1])  # "Submitted batch job N"
    info = slurm.wait(job)
    log = next(sandbox.glob(f"*-{job}.out"), None)
    assert info["JobState"] == "COMPLETED", log.read_text() if log else info
    shutil.rmtree(sandbox / "runs", ignore_errors=True)
