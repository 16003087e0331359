"""The typed schema of ``mpistyle-watch`` (configs/watch.yaml, and the ``storage/`` and
``runner/`` groups, build on it), and :func:`check` for what a type cannot express. Kept apart
from :mod:`mpistyle.config` so the restyling schema and the watcher's change independently.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ..errors import ConfigError, first_line
from . import names, sidecar
from .runners import SECRET_VARIABLES, is_credential_name

AREAS = ("input", "output", "work")


@dataclass
class AreaConfig:
    """One storage area: a blob container (url, prefix, credential_env) or a local folder (root)."""

    kind: str = "local"
    root: str | None = None
    url: str | None = None  # the container URL, e.g. https://ACCOUNT.blob.core.windows.net/videos-in
    prefix: str = ""
    # Name of the environment variable holding the SAS token or connection string; unset or
    # empty: DefaultAzureCredential. The secret itself never goes in the config.
    credential_env: str | None = None


@dataclass
class QueueConfig:
    """The Azure Storage Queue that Event Grid delivers the input container's BlobCreated
    events to (``intake=queue``)."""

    url: str | None = None  # the queue URL, e.g. https://ACCOUNT.queue.core.windows.net/videos-in-events
    # Name of the environment variable holding its SAS token or connection string, as for an area.
    credential_env: str | None = None


@dataclass
class StorageAreas:
    input: AreaConfig = field(default_factory=AreaConfig)
    output: AreaConfig = field(default_factory=AreaConfig)
    work: AreaConfig = field(default_factory=AreaConfig)  # state records, logs, quarantine
    queue: QueueConfig = field(default_factory=QueueConfig)


@dataclass
class RunnerConfig:
    kind: str = "local"  # local: run here, now; slurm: sbatch slurm/style.sbatch
    ranks: int = 1  # local: mpirun -n ranks
    python: str | None = None  # local: the Python with mpistyle (default: this one)
    script: str | None = None  # slurm: the sbatch script (default: slurm/style.sbatch)
    sbatch_args: list[str] = field(default_factory=list)  # slurm: e.g. [--partition=gpu, --gpus-per-node=1]
    # A job gets only an allow-listed part of the watcher's environment (PATH, HOME, LANG, LC_*,
    # PYTHONPATH, OMPI_*, MPISTYLE_* but the credentials, ...: see mpistyle.watch.runners): name any
    # other variable a job needs here. Credential variables are refused.
    env_pass: list[str] = field(default_factory=list)


@dataclass
class MetricsConfig:
    """Where the watcher's OpenTelemetry figures go (see mpistyle.watch.metrics). Azure Monitor
    is configured by APPLICATIONINSIGHTS_CONNECTION_STRING in the environment alone: the
    connection string holds the resource's key, and no config may carry a secret."""

    # Serve Prometheus' /metrics on this port, for as long as the watcher runs: with every= only
    # (a cron tick lives seconds, too short to be scraped). null: no endpoint.
    prometheus_port: int | None = None
    # Loopback by default: scraped from this host (or through a tunnel or an agent); 0.0.0.0 or
    # a host address serves it to the network, unauthenticated.
    prometheus_address: str = "127.0.0.1"
    # How often a watcher ticking in a loop pushes to Azure Monitor (a cron tick pushes once, as
    # it ends).
    export_interval_s: float = 60.0


@dataclass
class WatchConfig:
    storage: StorageAreas = field(default_factory=StorageAreas)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # null: one tick, then exit (cron, a systemd timer, scrontab). A number: tick in a loop, each
    # tick starting that many seconds after the last began (at once if it took longer), until
    # SIGTERM or SIGINT; the process that serves metrics.prometheus_port.
    every: float | None = None
    workdir: str = "mpistyle-watch"  # shared filesystem when the runner is Slurm
    # How a tick finds new videos. list: list the input area (and read each video's record) every
    # tick. queue: read Event Grid's BlobCreated events from storage.queue (docs/watch.md), and
    # list only every reconcile_every_s, for events that never came.
    intake: str = "list"
    queue_messages_per_tick: int = 32
    # A video a tick could not finish (a job still running, a retry backing off): its message
    # comes back after this long, for a later tick to carry it on.
    queue_revisit_s: float = 60.0
    reconcile_every_s: float = 3600.0
    # Failures that may be the input's fault (a bug, exit 1, or the time limit) before it is
    # quarantined; exit 3 quarantines at once, and anyone else's fault never counts.
    max_attempts: int = 3
    # Up to this many videos ready to start in one tick run as one batch job (inputs=, see
    # docs/batch.md): start-up and model loads paid once. 1: a job of its own per video.
    max_batch: int = 1
    lease_s: float = 600.0
    # A job running longer is stopped (local: SIGTERM to its process group, SIGKILL after
    # job_kill_grace_s; Slurm: sbatch --time, and scancel past the limit plus the grace) and
    # counts as a failed attempt: the input may be why (too long for the limit).
    job_time_limit_s: float = 6 * 3600.0
    job_kill_grace_s: float = 60.0
    # A tick starts no further video after this long, so a backlog cannot hold the tick (and the
    # tick script's lock) for hours; the rest wait for the next tick.
    tick_time_limit_s: float = 3600.0
    # A job failing through no fault of the input (configuration, staging full, storage, a
    # signal, an out-of-memory kill, a lost or preempted job) is retried on a later tick after
    # retry_backoff_s, doubling with each such failure up to retry_backoff_max_s.
    retry_backoff_s: float = 60.0
    retry_backoff_max_s: float = 3600.0
    # After this many such failures in a row the video is still retried (never quarantined for
    # someone else's fault), but each tick logs an error and exits 9, so monitoring sees it.
    retry_alert: int = 5
    # mpistyle-watch status exits 10 (stuck) for a record on its way (claimed, staged, submitted,
    # finished) that has not changed step for this long: more than job_time_limit_s plus the
    # longest a job may wait in the Slurm queue, so a long job is not taken for a stuck one.
    stuck_after_s: float = 12 * 3600.0
    job_overrides: list[str] = field(default_factory=list)  # Hydra overrides for every job
    delete_inputs: bool = False  # delete an input once done or quarantined (needs delete rights)
    # A state record whose input version is no longer listed (deleted, or replaced by a new
    # upload) and that nobody changed for this long is ended: its local files removed, then it goes.
    sweep_after_s: float = 86400.0
    # Flood control: no job starts while the runner holds max_active_jobs of the watchers' jobs,
    # queued or running (Slurm: squeue; local: this host's), nor once a tick has started
    # max_submit_per_tick; 0: no limit. The videos over either wait, not downloaded, for a later tick.
    max_active_jobs: int = 100
    max_submit_per_tick: int = 50
    # Per-video settings (docs/watch.md): a JSON object in <video name>.json beside the video, which
    # may set only these keys (each a batch line's per-video setting, or model: one of
    # settings_models); a refused one quarantines the video, with the reason.
    settings_allowed: list[str] = field(default_factory=lambda: ["model", "model.style", "model.blend", "model.style_image"])
    settings_models: list[str] = field(default_factory=lambda: ["multistyle", "arbitrary"])
    # The input area's folder of pictures that model.style_image names (never taken as videos);
    # "": no style images.
    style_images: str = "styles/"
    # A video without a settings file is taken once this old (seconds since its upload), so a
    # settings file uploaded just after it is not missed; 0: at once (upload the settings first).
    settings_wait_s: float = 0.0


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="watch", node=WatchConfig)
    store.store(group="schema", name="storage", node=StorageAreas)
    store.store(group="schema", name="runner", node=RunnerConfig)


def credential_names(storage: DictConfig) -> set[str]:
    """Every variable that may hold a credential: never handed to a job, never in env_pass."""
    named = [storage[area].credential_env for area in (*AREAS, "queue") if area in storage]
    return {*SECRET_VARIABLES, *(name for name in named if name)}


def check(cfg: DictConfig) -> None:
    """Checks on the watch config beyond types, each naming the override to fix."""
    for area in (*AREAS, "queue"):
        if "sig=" in (cfg.storage[area].url or "").lower():
            variable = cfg.storage[area].credential_env or f"MPISTYLE_{area.upper()}_CREDENTIAL"
            also = "" if cfg.storage[area].credential_env else f" and set storage.{area}.credential_env={variable}"
            what = "queue URL" if area == "queue" else "container URL"
            raise ConfigError(
                f"storage.{area}.url carries a SAS token, and a command line shows in ps and in systemd's unit status: "
                f"give the {what} alone, put the SAS in the environment variable {variable}{also}"
            )
    if cfg.intake not in ("list", "queue"):
        raise ConfigError(f"intake must be list or queue, not {cfg.intake!r}")
    if cfg.intake == "queue":
        if cfg.storage.input.kind != "blob":
            raise ConfigError("intake=queue reads Event Grid's events for a blob container: it needs storage=blob")
        if not cfg.storage.queue.url:
            raise ConfigError("intake=queue needs storage.queue.url, the URL of the queue Event Grid delivers to")
        if not 1 <= cfg.queue_messages_per_tick <= 1000:
            raise ConfigError(f"queue_messages_per_tick must be 1 to 1000, got {cfg.queue_messages_per_tick}")
        for key in ("queue_revisit_s", "reconcile_every_s"):
            if not cfg[key] >= 0:
                raise ConfigError(f"{key} must be 0 or more, got {cfg[key]}")
    for key in ("job_time_limit_s", "tick_time_limit_s", "retry_backoff_s", "retry_backoff_max_s", "retry_alert",
                "stuck_after_s"):
        if not cfg[key] > 0:  # also refuses nan
            raise ConfigError(f"{key} must be positive, got {cfg[key]}")
    if not cfg.max_batch >= 1:
        raise ConfigError(f"max_batch must be 1 or more (1 runs a job of its own per video), got {cfg.max_batch}")
    if cfg.every is not None and not cfg.every > 0:
        raise ConfigError(f"every must be a number of seconds above 0 (or null: one tick), got {cfg.every}")
    if not cfg.metrics.export_interval_s > 0:
        raise ConfigError(f"metrics.export_interval_s must be positive, got {cfg.metrics.export_interval_s}")
    port = cfg.metrics.prometheus_port
    if port is not None:
        if not 0 < port < 65536:
            raise ConfigError(f"metrics.prometheus_port must be a TCP port (1-65535), got {port}")
        if cfg.every is None:
            raise ConfigError(
                "metrics.prometheus_port serves /metrics only while the watcher runs, and one tick lives too short to "
                "be scraped: add every=60 (tick in a loop, under systemd or a supervisor), or leave the port out"
            )
    if not cfg.job_kill_grace_s >= 0:
        raise ConfigError(f"job_kill_grace_s must be 0 or more, got {cfg.job_kill_grace_s}")
    for key in ("max_active_jobs", "max_submit_per_tick", "settings_wait_s"):
        if not cfg[key] >= 0:
            raise ConfigError(f"{key} must be 0 (no limit) or more, got {cfg[key]}")
    _check_settings(cfg)
    try:  # what every job composes: a mistake here is the operator's, said once, not per video
        job_config(cfg.job_overrides)
    except ConfigError as err:
        raise ConfigError(f"job_overrides do not make a job config: {err}") from None
    credentials = credential_names(cfg.storage)
    for name in cfg.runner.env_pass:
        if name in credentials or is_credential_name(name):
            raise ConfigError(f"runner.env_pass names {name}, a credential: jobs never get one (they work on local files)")
    for arg in cfg.runner.sbatch_args:
        if str(arg).startswith(("--export", "--time", "-t")):
            raise ConfigError(
                f"runner.sbatch_args sets {str(arg).split('=')[0]}, which the watcher sets itself: "
                "use job_time_limit_s for the time limit, runner.env_pass for the environment"
            )
        if str(arg).startswith("--requeue"):
            raise ConfigError(
                "runner.sbatch_args sets --requeue: the watcher submits with --no-requeue, so that a job whose "
                "node fails ends and its retry on a later tick resumes it within job_time_limit_s"
            )


def _check_settings(cfg: DictConfig) -> None:
    """The per-video settings a watcher may allow: a batch line's, or a model config of the package."""
    for key in cfg.settings_allowed:
        if key not in sidecar.ALLOWED:
            raise ConfigError(f"settings_allowed names {key}, which is no per-video setting "
                              f"(one of {', '.join(sorted(sidecar.ALLOWED))})")
    models = sorted(path.name.removesuffix(".yaml") for path in (resources.files("mpistyle.configs") / "model").iterdir()
                    if path.name.endswith(".yaml"))
    for model in cfg.settings_models:
        if model not in models:
            raise ConfigError(f"settings_models names {model}, which is no model config (one of {', '.join(models)})")
    folder = cfg.style_images
    try:
        if folder:
            names.check_name(folder.removesuffix("/") if folder.endswith("/") else "", "input")
    except names.UnsafeName:
        raise ConfigError(f"style_images must be a folder of the input area ending in '/', like styles/, or '', "
                          f"got {folder!r}") from None


def job_config(overrides: Sequence[str]) -> DictConfig:
    """The config ``mpistyle`` composes for a job from ``overrides``: what the watcher checks a
    video against before any job starts (its limits, its own settings). A ConfigError says why
    it does not compose."""
    from .. import config as job_schema

    job_schema.register()
    try:
        if GlobalHydra.instance().is_initialized():  # inside mpistyle-watch's own @hydra.main
            return compose("config", overrides=list(overrides))
        with initialize_config_module("mpistyle.configs", version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as err:  # Hydra and OmegaConf raise many types, all about the overrides
        raise ConfigError(first_line(err)) from None
