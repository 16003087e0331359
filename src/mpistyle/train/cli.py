"""The ``mpistyle-train`` command: like ``mpistyle``'s CLI (one run directory agreed by every
rank, Hydra config, one line and an exit code per error), calling :func:`loop.run`."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import TracebackType

import hydra
from omegaconf import DictConfig

from .. import signals, train_config
from ..cli import _log_file_only, _new_run_id, _setup_logging, check_overrides
from ..errors import InternalError, MpistyleError
from ..parallel import RankContext

log = logging.getLogger("mpistyle")
_ctx: RankContext | None = None


def main() -> None:
    global _ctx
    _ctx = RankContext.world()
    # Every rank must use one run directory: rank 0 names it, the others are told. Under Slurm
    # it is the job id, so a requeued job finds its checkpoint and resumes.
    os.environ["MPISTYLE_RUN_ID"] = _ctx.share(_new_run_id)
    if not _ctx.is_root:
        # Only rank 0 writes Hydra's config dumps (and the log file).
        sys.argv.append("hydra.output_subdir=null")
    sys.excepthook = _abort_on_crash
    signals.install()
    train_config.register()
    check_overrides(sys.argv[1:], config_name="train", show=_ctx.is_root)
    _hydra_main()


@hydra.main(config_path="pkg://mpistyle.configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    assert _ctx is not None
    run_dir = Path(cfg.run_dir)
    try:
        _setup_logging(_ctx, run_dir)
        from .loop import run  # after logging is set up: importing torch takes a moment

        run(cfg, _ctx)
    except MpistyleError as err:
        # Every rank holds the same error; one line from rank 0 is enough.
        if _ctx.is_root:
            first_line = str(err).splitlines()[0]
            if isinstance(err, InternalError):
                # A bug: the traceback goes to the log file, the terminal gets one line.
                _log_file_only(logging.ERROR, str(err))
                log.error("error: %s (traceback in %s)", first_line, run_dir / "mpistyle.log")
            else:
                log.error("error: %s", first_line)
        logging.shutdown()
        sys.exit(err.exit_code)
    except Exception as err:  # a bug outside the ranks' agreed error path
        # Hydra would print this and exit this rank alone, leaving the others waiting forever.
        log.exception("internal error on rank %d: %s", _ctx.rank, err)
        logging.shutdown()
        _ctx.abort(1)
        sys.exit(1)


def _abort_on_crash(kind: type[BaseException], value: BaseException, trace: TracebackType | None) -> None:
    """An exception nobody caught must not leave the other ranks waiting forever."""
    sys.__excepthook__(kind, value, trace)
    if _ctx is not None:
        _ctx.abort(1 if not isinstance(value, KeyboardInterrupt) else 130)
