"""``run(cfg)``: one job from input video to output video, on one rank or many. Only the order
of the steps lives here; each step is owned by one module:

  plan (root: plan.py)  ->  load the model (all: scoring.py)
    ->  decode, score, encode, stage segments, each rank taking the next as it goes (all: worker.py)
    ->  join the staged segments with the audio (root: join.py)  ->  report, preview (root: report.py)

:mod:`mpistyle.parallel` is the only place ranks are handled.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig

from . import config, signals
from .devices import pick_device
from .errors import InternalError, MpistyleError
from .hwcodecs import beside_gpu, encoder_key, on_nvenc, pick_decoder, pick_encoder
from .join import join
from .parallel import RankContext, Shift, attempt, unwrap
from .plan import Plan, make_plan
from .report import Progress, RankSummary, RunFacts, StageTimer, job_report, write_json, write_preview
from .scoring import Scorer, build_scorer, wants_compile
from .segment import Segment, largest_first
from .video import Cuvid
from .worker import Finished, Worker, score_segments

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One run's settings and its clock, as the steps after scoring need them."""

    cfg: DictConfig
    run_id: str
    timer: StageTimer
    started: float
    delivered: Callable[[], None] | None = None  # called on the root the moment the output is in place


# Scorers loaded by earlier videos of a batch (mpistyle.batch), by what they were built from;
# the last few only, so a batch of many styles or frame sizes does not fill the GPU's memory.
Scorers = dict[str, Scorer]
_SCORERS_KEPT = 2


def run(
    cfg: DictConfig,
    ctx: RankContext | None = None,
    run_id: str | None = None,
    scorers: Scorers | None = None,
    delivered: Callable[[], None] | None = None,
    compile_pixels: int | None = None,
    planned: Plan | None = None,
) -> dict[str, Any]:
    """Restyle ``cfg.input`` into ``cfg.output``. Returns the job report (on every rank).
    ``scorers``: models loaded for earlier videos of the same batch, reused where they fit;
    ``delivered``: called on the root right after the output is renamed into place;
    ``compile_pixels``: the work a compiled model would serve, for ``compile=auto`` (a batch's
    videos of the same model and frame size; default: this video's pixels); ``planned``: the
    plan, when the caller made it already (every rank holds it).

    Raises an :class:`~mpistyle.errors.MpistyleError` subclass, the same on every rank, when
    the job cannot be done; the input is never modified and no partial output is left.
    """
    try:
        config.check(cfg)
        ctx = ctx or RankContext.world()
        job = Job(cfg, run_id or f"{os.getpid()}", StageTimer(), time.perf_counter(), delivered)
        with job.timer("probe"):
            plan = planned or ctx.from_root(lambda: make_plan(cfg))
        with job.timer("load_model"):
            scorer = ctx.check_all(lambda: _then_check(_load_model(cfg, ctx, plan, scorers, compile_pixels)))
        kinds = set(ctx.gather_all(scorer.kernels))
        if len(kinds) > 1:
            # A frame's pixels would depend on which rank scored it: every rank goes eager.
            log.warning("the ranks compiled differently (%s): every rank scores eagerly", ", ".join(sorted(kinds)))
            scorer.use_eager()
        planned = plan
        plan, cuvid = _gpu_codecs(cfg, ctx, planned, scorer)
        made_by = scorer.kernels if plan.settings == planned.settings else f"{scorer.kernels}-{encoder_key(plan.settings)}"
        plan = replace(plan, staging=plan.staging.scored_with(made_by))
        ctx.check_all(plan.staging.create)
    except MpistyleError as err:
        # The checks' own errors (2-6); a signal or a bug during them is not a refusal.
        err.before_work = not isinstance(err, InternalError) and 2 <= err.exit_code <= 6
        raise
    scored = _score(job, plan, scorer, ctx, cuvid)
    return ctx.from_root(lambda: finish(job, plan, unwrap(scored)))


def _load_model(
    cfg: DictConfig, ctx: RankContext, plan: Plan, scorers: Scorers | None, compile_pixels: int | None
) -> Scorer:
    """This rank's scorer, run once on a blank frame so compiling happens here, not mid-job;
    one an earlier video of the batch loaded for the same setting and frame size, if any."""
    info = plan.info
    pixels = compile_pixels or info.frames * info.width * info.height
    key = json.dumps(
        [config.plain(cfg.model), cfg.device, cfg.precision, str(cfg.compile), cfg.compile_cache, cfg.batch_size,
         cfg.threads, info.height, info.width, wants_compile(cfg.compile, pick_device(cfg.device, ctx.local_rank), pixels)],
        sort_keys=True, default=str,
    )
    if scorers is not None and key in scorers:
        scorer = scorers[key]
        log.info("rank %d/%d: the model an earlier video loaded (%s kernels)", ctx.rank, ctx.size, scorer.kernels)
        return scorer
    scorer = build_scorer(cfg, ctx.local_rank, ctx.cpus, pixels)
    how = scorer.prepare(info.height, info.width)
    if scorers is not None:
        while len(scorers) >= _SCORERS_KEPT:  # a batch of many styles or sizes: the oldest goes
            scorers.pop(next(iter(scorers)))
        scorers[key] = scorer
    log.info(
        "rank %d/%d on %s: %s, %s, %s, %d thread(s)",
        ctx.rank, ctx.size, ctx.host, scorer.device, scorer.precision, how, scorer.threads,
    )
    return scorer


def _gpu_codecs(cfg: DictConfig, ctx: RankContext, plan: Plan, scorer: Scorer) -> tuple[Plan, Cuvid | None]:
    """The plan with this rank's encoder, and its GPU decoder (None: the CPU's): the GPU's
    (``video.decoder``, ``video.encoder``) only where every rank has it, so every segment is
    encoded alike (they are joined by stream copy) and decoded alike (MPEG-2's GPU decoding may
    round differently from the CPU's)."""
    # Every rank asks its own GPU first (a refusal is every rank's error), then they compare.
    cuvid, nvenc = ctx.check_all(
        lambda: (pick_decoder(cfg.video.decoder, plan.info, scorer.device),
                 pick_encoder(plan.settings, plan.info, scorer.device, plan.container_format))
    )
    decoders, encoders, gpus = zip(*ctx.gather_all((cuvid is not None, nvenc, scorer.device.type == "cuda")), strict=True)
    if not all(decoders):
        if cuvid is not None:
            log.info("decoding on the CPU: not every rank can decode on its GPU")
        cuvid = None
    if len(set(encoders)) > 1:
        log.info("encoding on the CPU (%s): not every rank has a GPU encoder", plan.settings.codec)
    if len(set(encoders)) == 1 and nvenc is not None:
        plan = replace(plan, settings=on_nvenc(plan.settings, nvenc, scorer.device))
    elif all(gpus) and cfg.video.encoder == "auto":
        plan = replace(plan, settings=beside_gpu(plan.settings))
    if ctx.is_root:
        log.info(
            "decoder: %s; encoder: %s%s", cuvid.name if cuvid else f"{plan.info.codec} (CPU)", plan.settings.codec,
            f", preset {plan.settings.preset}" if plan.settings.preset else "",
        )
    return plan, cuvid


def _score(job: Job, plan: Plan, scorer: Scorer, ctx: RankContext, cuvid: Cuvid | None) -> tuple[bool, Any]:
    """Every rank scores the segments it is handed, until none are left, progress going to the
    root; what each returned, or failed with."""
    cfg = job.cfg
    progress = Progress(plan.info.frames, cfg.report.progress, cfg.report.progress_interval_s) if ctx.is_root else None
    overlap = cfg.overlap if cfg.overlap is not None else scorer.device.type != "cpu"

    handout = largest_first(plan.segments)

    def work(shift: Shift) -> tuple[RankSummary, list[Finished]]:
        def take() -> Segment | None:
            turn = shift.take()
            return None if turn is None else handout[turn]

        worker = Worker(plan, scorer, shift.tick, take, cfg.on_damage, overlap, cuvid)
        return score_segments(worker, ctx.rank, ctx.host)

    with job.timer("score"):
        scored = attempt(lambda: ctx.run_everywhere(work, progress.add if progress else _ignore, len(plan.segments)))
    if progress:
        progress.close()
    return scored


def finish(job: Job, plan: Plan, results: list[tuple[RankSummary, list[Finished]]]) -> dict[str, Any]:
    """Root: join the staged segments into the output, then the preview and the job report."""
    cfg = job.cfg
    with job.timer("join"):
        join(plan, [done for _, finished in results for done in finished], job.delivered)
    with job.timer("preview"):
        previewed = write_preview(plan, cfg.report.preview_frames)
    total = time.perf_counter() - job.started
    facts = RunFacts(
        job.run_id, config.plain(cfg.model), cfg.on_damage, dict(job.timer.seconds), total, cfg.staging.keep, previewed
    )
    report = job_report(plan, [summary for summary, _ in results], facts).as_dict()
    write_json(plan.report, report)
    if not cfg.staging.keep:
        plan.staging.remove(remove_empty_root=not cfg.staging.root)
    frames = plan.info.frames
    log.info(
        "wrote %s: %d frames in %.1f s (%.2f fps end to end) on %d rank(s)",
        plan.output, frames, total, frames / total if total else 0.0, len(results),
    )
    log.info("report: %s", plan.report)
    if previewed:
        log.info("preview: %s", plan.preview)
    return report


def _then_check(value: Any) -> Any:
    signals.check()
    return value


def _ignore(frames: int) -> None:
    del frames
