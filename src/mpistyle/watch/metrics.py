"""The watcher's figures as OpenTelemetry metrics, and where they go.

:class:`WatchMetrics` holds the instruments the watcher records into as things happen: videos
claimed, delivered and quarantined, attempts (jobs started for a video) and failed jobs, each
delivered video's job seconds, frames and frames/s (from its report), and per tick the queue
(videos listed and not in a final state, by their tick's outcome), the jobs still running, the
tick's length and its errors. No attribute ever names a video, a path or a host: only a few
fixed words (why a video was quarantined, whose fault a failure was, a queued video's state),
so the series stay few and nothing a user uploaded reaches a monitoring system.

:func:`exported` wires them to the exporters the config and the environment ask for:

- **Prometheus**: ``/metrics`` on ``metrics.prometheus_port`` (``metrics.prometheus_address``,
  loopback by default), served by a watcher that ticks in a loop (``every=``): a cron tick lives
  seconds, too short to be scraped. Counters count from the process's start (Prometheus'
  ``rate`` and ``increase`` take its restarts in their stride).
- **Azure Monitor**: when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set, pushed every
  ``metrics.export_interval_s`` and once more as the watcher stops, so a cron tick sends its
  figures as it ends. Azure Monitor takes counters and histograms as deltas, so the ticks of
  any number of watchers add up there. The string is read from the environment only (never a
  config) and registered for redaction. The exporter connects to the resource's ingestion
  endpoint alone (the SDK's calls to Microsoft are off unless the environment turns them on),
  not before the first interval or the end, and keeps nothing on disk (no offline retry store:
  it would hold the key).

With neither, the instruments are OpenTelemetry's no-ops and no SDK is imported.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from omegaconf import DictConfig
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation

from .. import __version__
from ..errors import ConfigError
from ..secrets import from_env, redact

log = logging.getLogger("mpistyle.watch")

AZURE_MONITOR_VARIABLE = "APPLICATIONINSIGHTS_CONNECTION_STRING"
_SDK_CALLS_HOME = ("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED")
# The tick outcomes of a listed video that is not final yet (queue depth by state), plus
# "later": listed but not reached before tick_time_limit_s; anything else counts as "other".
QUEUED_STATES = ("waiting", "running", "failed", "retrying", "stuck", "busy", "taken", "error", "later", "other")
# Bucket bounds: a job from seconds to the default 6 h limit; from a fraction of a frame per
# second (a big model on a CPU) to hundreds (a GPU); a tick from an empty listing to hours.
_SECONDS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)
_FRAMES_PER_S = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
_TICK_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200)


class WatchMetrics:
    """The watcher's instruments on ``meter`` (default: no-ops)."""

    def __init__(self, meter: Meter | None = None) -> None:
        meter = meter or NoOpMeter("mpistyle.watch")
        self.claimed = meter.create_counter(
            "mpistyle.watch.videos.claimed", "{video}", "Videos claimed: a state record created for a new video version")
        self.done = meter.create_counter(
            "mpistyle.watch.videos.done", "{video}", "Videos delivered to the output area")
        self.quarantined = meter.create_counter(
            "mpistyle.watch.videos.quarantined", "{video}",
            "Videos quarantined, by reason: name (refused unread), input (not a usable video, or refused by the "
            "probe or its settings before any job), attempts (max_attempts failed jobs), output_name (another input "
            "holds its output name), watcher (intake=queue: watchers died max_attempts times holding its message)")
        self.attempts = meter.create_counter(
            "mpistyle.watch.attempts", "{attempt}", "Jobs started for a video (a batch job counts once for each of its videos)")
        self.failures = meter.create_counter(
            "mpistyle.watch.failures", "{failure}",
            "A video's job that ended without its output, by fault: input, attempt (a bug, a crash or the time limit), "
            "elsewhere (not the input's: retried with backoff)")
        self.errors = meter.create_counter(
            "mpistyle.watch.errors", "{error}",
            "Storage or scheduler errors: a video a tick could not move on, or a tick that failed as a whole")
        self.queue_depth = meter.create_gauge(
            "mpistyle.watch.queue.depth", "{video}",
            "Videos in the input area not in a final state at the end of the last tick, by state (the tick's outcome)")
        meter.create_observable_gauge(
            "mpistyle.watch.jobs.active", [self._observe_jobs], "{job}",
            "Jobs this watcher started or follows that were running when last seen")
        self.tick_duration = meter.create_histogram(
            "mpistyle.watch.tick.duration", "s", "How long each tick took", explicit_bucket_boundaries_advisory=_TICK_S)
        self.job_duration = meter.create_histogram(
            "mpistyle.job.duration", "s", "Seconds a job spent on a delivered video (its report's stages_s.total)",
            explicit_bucket_boundaries_advisory=_SECONDS)
        self.job_frames = meter.create_counter(
            "mpistyle.job.frames", "{frame}", "Frames of the delivered videos (their reports' frames)")
        self.job_throughput = meter.create_histogram(
            "mpistyle.job.throughput", "{frame}/s", "Frames a second of a delivered video's job, end to end (its report's fps)",
            explicit_bucket_boundaries_advisory=_FRAMES_PER_S)
        self._active: set[str] = set()  # job handles running when last seen
        self._seen: set[str] = set()  # ... seen running during this tick

    def _observe_jobs(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(len(self._active))]

    def job_running(self, handle: str) -> None:
        """The job ``handle`` was started, or found still running."""
        self._active.add(handle)
        self._seen.add(handle)

    def job_ended(self, handle: str) -> None:
        self._active.discard(handle)

    def tick_started(self) -> None:
        self._seen = set()

    def tick_ended(self, seconds: float, pending: Sequence[str], unreached: int) -> None:
        """The tick's own figures: ``pending``, the outcomes of the listed videos it left in no
        final state, and ``unreached``, how many it listed but did not reach."""
        # A job neither started nor seen running this tick was ended or taken over by another watcher.
        self._active &= self._seen
        states = Counter(o if o in QUEUED_STATES else "other" for o in pending)
        states["later"] = unreached
        for state in QUEUED_STATES:  # every state, zeros too: a gauge keeps its last value
            self.queue_depth.set(states[state], {"state": state})
        self.tick_duration.record(seconds)

    def delivered(self, report: dict[str, Any]) -> None:
        """A delivered video's job figures, from its report (written by the job: each figure is
        taken only where it is a number)."""
        seconds = _number(report.get("stages_s", {}), "total")
        frames = _number(report, "frames")
        fps = _number(report.get("fps", {}), "end_to_end")
        if seconds is not None:
            self.job_duration.record(seconds)
        if frames is not None:
            self.job_frames.add(frames)
        if fps is not None:
            self.job_throughput.record(fps)


def _number(part: Any, key: str) -> float | None:
    value = part.get(key) if isinstance(part, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else None


@contextmanager
def exported(cfg: DictConfig) -> Iterator[WatchMetrics]:
    """The watcher's instruments, exported where ``cfg.metrics`` and the environment say until
    the block ends (then Azure Monitor gets the last figures and the endpoint closes)."""
    connection = from_env(AZURE_MONITOR_VARIABLE)
    port = cfg.metrics.prometheus_port
    if connection is None and port is None:
        yield WatchMetrics()
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

    with ExitStack() as stack:
        readers: list[MetricReader] = []
        if port is not None:
            readers.append(stack.enter_context(_prometheus(cfg.metrics.prometheus_address, port)))
        if connection is not None:
            readers.append(_azure_monitor(connection, cfg.metrics.export_interval_s))
        resource = Resource.create({"service.name": "mpistyle-watch", "service.version": __version__})
        provider = MeterProvider(metric_readers=readers, resource=resource)
        # Registered after the endpoint, so it ends first: the last figures pushed while /metrics still answers.
        stack.callback(provider.shutdown, timeout_millis=30_000)
        yield WatchMetrics(provider.get_meter("mpistyle.watch", __version__))


@contextmanager
def _prometheus(address: str, port: int) -> Iterator[Any]:
    """A reader whose figures ``/metrics`` on ``address:port`` serves while the block runs."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, start_http_server

    try:
        server, thread = start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as err:
        raise ConfigError(
            f"cannot serve metrics on {address}:{port}: {err.strerror or err} (set metrics.prometheus_port to a free port, "
            "metrics.prometheus_address to an address of this host)"
        ) from None
    log.info("metrics: serving Prometheus on http://%s:%d/metrics", address, server.server_port)
    try:
        yield PrometheusMetricReader()  # registers itself in REGISTRY, which the server serves
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _azure_monitor(connection: str, interval_s: float) -> Any:
    """A reader pushing to the Application Insights resource of ``connection`` (a secret)."""
    from azure.monitor.opentelemetry.exporter import AzureMonitorMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    # The figures go to the operator's resource and nowhere else: the SDK's own telemetry to
    # Microsoft (statsbeat) and its remote settings service (polled from 5-15 s after start)
    # stay off unless the environment turns them on (set to false).
    for variable in _SDK_CALLS_HOME:
        os.environ.setdefault(variable, "true")
    try:
        # No offline store: its retry files (in a temporary folder named by the key, by default)
        # would hold the key; figures a failed push held are lost, and the next push sends on.
        exporter = AzureMonitorMetricExporter(connection_string=connection, disable_offline_storage=True)
    except ValueError as err:  # its messages say what is wrong, never the value; scrubbed anyway
        raise ConfigError(
            f"{AZURE_MONITOR_VARIABLE} is not a usable Application Insights connection string: {redact(str(err))} "
            "(copy it from the resource's Overview page, or unset it)"
        ) from None
    log.info("metrics: exporting to Azure Monitor (%s) every %g s and as the watcher stops", AZURE_MONITOR_VARIABLE,
             interval_s)
    return PeriodicExportingMetricReader(exporter, export_interval_millis=interval_s * 1000)
