"""``run(cfg)``: one job from input video to output video, on one rank or many; ``prepare`` and
``run_queue``: the same steps for many videos (a batch, :mod:`mpistyle.batch`) through one
queue. Only the order of the steps lives here; each step is owned by one module:

  plan (root: plan.py)  ->  load the model (all: scoring.py)
    ->  decode, score, encode, stage segments of any video, each rank taking the next as it goes
        (all: worker.py; the queue: delivery.py)
    ->  as each video's last segment is staged: join the segments with the audio (root: join.py)
        ->  report, preview (root: report.py)

:mod:`mpistyle.parallel` is the only place ranks are handled.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import config, signals
from .delivery import Deliveries, Outcome
from .devices import pick_device
from .errors import InternalError, MpistyleError
from .hwcodecs import beside_gpu, encoder_key, on_nvenc, pick_decoder, pick_encoder
from .join import join
from .parallel import RankContext, Shift, attempt, unwrap
from .plan import Plan, make_plan
from .report import (
    Progress,
    RankFacts,
    RankSummary,
    RunFacts,
    SegmentDone,
    StageTimer,
    job_report,
    write_json,
    write_preview,
)
from .scoring import Scorer, build_scorer, wants_compile
from .video import Cuvid
from .worker import Video, Worker, score_segments

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One video's settings and its clock, as the steps after scoring need them."""

    cfg: DictConfig
    run_id: str
    timer: StageTimer
    started: float | None  # None: a batch's video, counted from its first segment handed out
    # Called on the root with the complete output file just before it is renamed into place.
    ready: Callable[[Path], None] | None = None


# Scorers loaded by earlier videos of a batch (mpistyle.batch), by what they were built from.
Scorers = dict[str, Scorer]


def run(
    cfg: DictConfig,
    ctx: RankContext | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Restyle ``cfg.input`` into ``cfg.output``. Returns the job report (on every rank).

    Raises an :class:`~mpistyle.errors.MpistyleError` subclass, the same on every rank, when
    the job cannot be done; the input is never modified and no partial output is left.
    """
    ctx = ctx or RankContext.world()
    job = Job(cfg, run_id or f"{os.getpid()}", StageTimer(), time.perf_counter())
    video = prepare(job, ctx)
    outcome = run_queue(ctx, [(job, video)])[0]
    if isinstance(outcome, MpistyleError):
        raise outcome
    return outcome


def prepare(
    job: Job,
    ctx: RankContext,
    scorers: Scorers | None = None,
    compile_pixels: int | None = None,
    planned: Plan | None = None,
) -> Video:
    """Every rank: set up one video for the queue: its plan, each rank's model (and codecs), its
    staging folder. ``scorers``: models loaded for earlier videos of the same batch, reused
    where they fit (a new one is added); ``compile_pixels``: the work a compiled model would
    serve, for ``compile=auto`` (a batch's videos of the same model and frame size; default:
    this video's pixels); ``planned``: the plan, when the caller made it already (every rank
    holds it).

    Raises, the same on every rank, what stops the video before any frame is scored.
    """
    cfg = job.cfg
    try:
        config.check(cfg)
        with job.timer("probe"):
            plan = planned or ctx.from_root(lambda: make_plan(cfg))
        with job.timer("load_model"):
            scorer = ctx.check_all(lambda: _then_check(_load_model(cfg, ctx, plan, scorers, compile_pixels)))
        on_gpu = scorer.device.type == "cuda"
        agreed = ctx.gather_all((scorer.kernels, scorer.batch_size if on_gpu else None))
        kinds = {kind for kind, _ in agreed}
        if len(kinds) > 1:
            # A frame's pixels would depend on which rank scored it: every rank goes eager.
            log.warning("the ranks compiled differently (%s): every rank scores eagerly", ", ".join(sorted(kinds)))
            scorer.use_eager()
        gpu_batches = {batch for _, batch in agreed if batch is not None}
        if on_gpu and len(gpu_batches) > 1:
            # GPUs of different sizes fit different batches, and the batch changes a frame's rounding.
            smallest = min(gpu_batches)
            log.warning("the ranks' GPUs fit batches of %s frames: every GPU rank takes %d", sorted(gpu_batches), smallest)
            scorer.batch_size = smallest
        planned = plan
        plan, cuvid = _gpu_codecs(cfg, ctx, planned, scorer)
        made_by = scorer.kernels if plan.settings == planned.settings else f"{scorer.kernels}-{encoder_key(plan.settings)}"
        plan = replace(plan, staging=plan.staging.scored_with(made_by))
        ctx.check_all(plan.staging.create)
    except MpistyleError as err:
        # The checks' own errors (2-6); a signal or a bug during them is not a refusal.
        err.before_work = not isinstance(err, InternalError) and 2 <= err.exit_code <= 6
        raise
    overlap = cfg.overlap if cfg.overlap is not None else scorer.device.type != "cpu"
    facts = RankFacts(
        ctx.rank, ctx.host, str(scorer.device), scorer.threads if scorer.device.type == "cpu" else None,
        scorer.precision, scorer.compiled, overlap, cuvid.name if cuvid else plan.info.codec, plan.settings.codec,
        scorer.batch_size,
    )
    return Video(plan, scorer, tuple(ctx.gather_all(facts)), cfg.on_damage, cuvid)


def run_queue(
    ctx: RankContext,
    videos: Sequence[tuple[Job, Video]],
    on_outcome: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Every rank scores the segments of every video from one queue; the root delivers each
    video the moment its last segment is staged (:mod:`mpistyle.delivery`). Returns each
    video's outcome, in order, on every rank: its report, or the error it failed alone with
    (``on_outcome``: called on the root as each video ends). Raises, the same on every rank,
    what ends the job (every video delivered by then stays delivered)."""
    own = [video for _, video in videos]
    progress = deliveries = None
    if ctx.is_root:
        shown = videos[0][0].cfg.report
        progress = Progress(sum(video.plan.info.frames for video in own), shown.progress, shown.progress_interval_s)

        # Videos of the same contents and settings share a staging folder: it goes with the last.
        users = Counter(video.plan.staging.dir for video in own)

        def finish_one(number: int, summaries: list[RankSummary], staged: list[SegmentDone], score_s: float) -> Any:
            plan = own[number].plan
            report = finish(videos[number][0], plan, summaries, staged, score_s, last=users[plan.staging.dir] == 1)
            users[plan.staging.dir] -= 1  # not for a video that failed: a retry of it reuses the folder
            return report

        deliveries = Deliveries(own, finish_one, on_outcome, lambda number: _start_clock(videos[number][0]))
    overlap = own[0].ranks[ctx.rank].overlap

    def work(shift: Shift) -> list[SegmentDone]:
        return score_segments(Worker(own, shift.tick, shift.take, shift.note, overlap), ctx.rank)

    scored = attempt(lambda: ctx.run_everywhere(
        work, progress.add if progress else _ignore, deliveries.items() if deliveries else None,
        deliveries.note if deliveries else None,
    ))
    if progress:
        progress.close()

    def outcomes() -> list[Outcome]:
        assert deliveries is not None
        delivered = deliveries.close()  # the videos done before any failure are delivered first
        unwrap(scored)
        return [delivered[number] for number in range(len(videos))]

    return ctx.from_root(outcomes)


def _start_clock(job: Job) -> None:
    """A batch's video is timed from its first segment handed out, after its own set-up."""
    if job.started is None:
        job.started = time.perf_counter() - sum(job.timer.seconds.values())


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
        log.debug("rank %d/%d: the model an earlier video loaded (%s kernels)", ctx.rank, ctx.size, scorer.kernels)
        return scorer
    scorer = build_scorer(cfg, ctx.local_rank, ctx.cpus, pixels)
    how = scorer.prepare(info.height, info.width)
    if scorers is not None:
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


def finish(
    job: Job, plan: Plan, summaries: Sequence[RankSummary], staged: Sequence[SegmentDone], score_s: float,
    last: bool = True,
) -> dict[str, Any]:
    """Root: join the staged segments into the output, then the preview and the job report;
    the staging folder is removed (unless kept) if ``last`` (no video after it in the queue reads it)."""
    cfg = job.cfg
    job.timer.seconds["score"] = score_s
    with job.timer("join"):
        join(plan, staged, job.ready)
    with job.timer("preview"):
        previewed = write_preview(plan, cfg.report.preview_frames)
    assert job.started is not None
    total = time.perf_counter() - job.started
    facts = RunFacts(
        job.run_id, config.plain(cfg.model), cfg.on_damage, dict(job.timer.seconds), total, cfg.staging.keep, previewed
    )
    report = job_report(plan, summaries, facts).as_dict()
    write_json(plan.report, report)
    if not cfg.staging.keep and last:
        plan.staging.remove(remove_empty_root=not cfg.staging.root)
    frames = plan.info.frames
    log.info(
        "wrote %s: %d frames in %.1f s (%.2f fps end to end) on %d rank(s)",
        plan.output, frames, total, frames / total if total else 0.0, len(summaries),
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
