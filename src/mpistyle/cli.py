"""The ``mpistyle`` command: agree on a run directory across ranks, let Hydra build the config,
call :func:`mpistyle.pipeline.run`, and turn errors into one line and an exit code."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from . import config, signals
from .errors import ConfigError, InternalError, MpistyleError, OutputError, first_line
from .parallel import RankContext
from .secrets import redact

log = logging.getLogger("mpistyle")


@dataclass(frozen=True)
class Launch:
    """What every rank knows before Hydra composes the config: its rank facts, and the run id
    every rank of the job agreed on (it names the run directory)."""

    ctx: RankContext
    run_id: str


def main() -> None:
    run_hydra(start("config", config.register), "config", _restyle)


def _restyle(cfg: DictConfig, launch: Launch) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_error(launch.ctx, run_dir):
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        # After logging is set up: importing torch takes a moment.
        if cfg.inputs:
            from .batch import run_batch

            config.check(cfg)
            run_batch(cfg, launch.ctx, launch.run_id)
        else:
            from .pipeline import run

            run(cfg, launch.ctx, launch.run_id)


def start(config_name: str, register: Callable[[], None]) -> Launch:
    """What every mpistyle command does before Hydra runs, on every rank."""
    ctx = RankContext.world()
    # Every rank must use one run directory: rank 0 names it, the others are told. Under Slurm
    # it is the job id, so a requeued job finds its staging or checkpoint and resumes.
    run_id = ctx.from_root(new_run_id)
    # The one place the run id travels through the environment: the configs name the run
    # directory ${oc.env:MPISTYLE_RUN_ID}, and OmegaConf resolves it whenever the config is
    # read, during the whole run. Our own code is handed the run id as a value (Launch).
    os.environ["MPISTYLE_RUN_ID"] = run_id
    sys.excepthook = _abort_on_crash(ctx)
    signals.install()
    register()
    check_overrides(sys.argv[1:], config_name=config_name, show=ctx.is_root)
    return Launch(ctx, run_id)


def run_hydra(launch: Launch, config_name: str, task: Callable[[DictConfig, Launch], None]) -> None:
    """Let Hydra compose ``config_name`` from the command line, make the run directory (or
    answer --help, --cfg), then call ``task(cfg, launch)``."""

    @hydra.main(config_path="pkg://mpistyle.configs", config_name=config_name, version_base="1.3")
    def hydra_task(cfg: DictConfig) -> None:
        task(cfg, launch)

    # Only rank 0 writes Hydra's config dumps (and, later, the log file).
    extra = [] if launch.ctx.is_root else ["hydra.output_subdir=null"]
    with _hydra_arguments(extra):
        hydra_task()


@contextmanager
def _hydra_arguments(extra: list[str]) -> Iterator[None]:
    """``@hydra.main`` reads its overrides from ``sys.argv`` and nowhere else: add ``extra``
    there while Hydra runs, and put the command line back after."""
    command_line = sys.argv
    sys.argv = [*command_line, *extra]
    try:
        yield
    finally:
        sys.argv = command_line


def check_overrides(args: list[str], config_name: str = "config", show: bool = True) -> None:
    """Compose the config once before Hydra does, so a bad override is one line and exit 2
    (Hydra itself prints several lines and exits 1). Flags such as --help go to Hydra as is.
    The message is scrubbed of secrets: an override may carry a SAS URL."""
    if any(arg.startswith("-") for arg in args):
        return
    run_dir = Path(str(compose_or_exit(args, config_name, show).hydra.run.dir))
    problem = _unwritable(run_dir)
    if problem:
        # Hydra creates the run directory itself, and fails with a traceback.
        if show:
            print(redact(f"error: cannot create the run directory {run_dir}: {problem} (set run_dir= or MPISTYLE_RUNS_DIR)"),
                  file=sys.stderr)
        sys.exit(OutputError.exit_code)


def compose_or_exit(args: list[str], config_name: str, show: bool = True) -> DictConfig:
    """``config_name`` composed with the overrides ``args`` as Hydra would (its ``hydra`` node
    too), for commands that run without ``@hydra.main``; a bad override is one line, scrubbed
    of secrets, and exit 2."""
    # Hydra's own settings compose too (hydra.run.dir names the run directory), its groups do not.
    overrides = [arg for arg in args if not arg.lstrip("+~").startswith("hydra/")]
    try:
        with initialize_config_module("mpistyle.configs", version_base="1.3"):
            composed = compose(config_name, overrides=overrides, return_hydra_config=True)
            str(composed.hydra.run.dir)  # resolved here, as Hydra does first: a bad value is a bad override
            return composed
    except Exception as err:  # Hydra and OmegaConf raise many types, all about the overrides
        text = f"{err}\n{err.__cause__ or ''}"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith(("full_key:", "object_type", "reference_type"))]
        if show:
            message = "; ".join(lines[:4]) or type(err).__name__
            print(redact(f"error: {message} (see --help)"), file=sys.stderr)
        sys.exit(ConfigError.exit_code)


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be created or written, or None if it can."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def new_run_id() -> str:
    """The Slurm job id (a requeued job keeps its directory), else a time stamp and pid."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return job
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


@contextmanager
def exit_on_error(ctx: RankContext, run_dir: Path) -> Iterator[None]:
    """Set up logging, then run the block; an error the ranks agreed on becomes one line from
    rank 0 and its exit code, and anything else (a bug) aborts every rank instead of leaving
    them waiting."""
    new_run = not (run_dir / "mpistyle.log").exists()  # a requeued Slurm job finds its own
    try:
        setup_logging(ctx, run_dir)
        yield
    except MpistyleError as err:
        # Every rank holds the same error; one line from rank 0 is enough.
        if ctx.is_root:
            line = first_line(err)
            if isinstance(err, InternalError):
                # A bug: the traceback goes to the log file, the terminal gets one line.
                _log_file_only(logging.ERROR, str(err))
                log.error("error: %s (traceback in %s)", line, run_dir / "mpistyle.log")
            else:
                log.error("error: %s", line)
        logging.shutdown()
        if ctx.is_root and err.before_work and new_run:
            # Refused before doing anything: the message above is the whole story, and a run
            # directory per refused attempt would only pile up.
            _remove_what_this_run_wrote(run_dir)
        sys.exit(err.exit_code)
    except Exception as err:  # a bug outside the ranks' agreed error path
        # Hydra would print this and exit this rank alone, leaving the others waiting forever.
        log.exception("internal error on rank %d: %s", ctx.rank, err)
        logging.shutdown()
        ctx.abort(1)
        sys.exit(1)


def _remove_what_this_run_wrote(run_dir: Path) -> None:
    """Remove the log and Hydra's config dump from ``run_dir``, then the folder if nothing else
    is in it: a run directory may be one the user named, holding their own files."""
    (run_dir / "mpistyle.log").unlink(missing_ok=True)
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass  # not empty: not only ours


def _log_file_only(level: int, message: str) -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, level, __file__, 0, message, (), None))


def setup_logging(ctx: RankContext, run_dir: Path) -> None:
    tag = f"rank {ctx.rank}/{ctx.size}" if ctx.size > 1 else "mpistyle"
    formatter = logging.Formatter(f"%(asctime)s [{tag}] %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if ctx.is_root:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "mpistyle.log"))
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    if ctx.is_root:
        log.info("run directory: %s", run_dir)


def _abort_on_crash(ctx: RankContext) -> Callable[[type[BaseException], BaseException, TracebackType | None], None]:
    def hook(kind: type[BaseException], value: BaseException, trace: TracebackType | None) -> None:
        """An exception nobody caught must not leave the other ranks waiting forever."""
        sys.__excepthook__(kind, value, trace)
        ctx.abort(1 if not isinstance(value, KeyboardInterrupt) else 130)

    return hook
