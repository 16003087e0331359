"""mpistyle-watch's metrics (issue 18): a watcher ticking in a loop serves them to Prometheus,
scraped here over loopback while it works on real videos with real jobs; Azure Monitor is
configured from the environment alone, starts without touching the network and never shows
its connection string; and the settings that cannot work are refused."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from mpistyle.errors import ConfigError
from mpistyle.sample import make_video
from mpistyle.secrets import redact
from mpistyle.watch import config as watch_config
from mpistyle.watch.areas import LocalArea
from mpistyle.watch.metrics import AZURE_MONITOR_VARIABLE, QUEUED_STATES, WatchMetrics, exported
from mpistyle.watch.names import job_name
from mpistyle.watch.runners import JobSpec, JobStatus, Runner
from test_watch import local_overrides, states, watch_command
from test_watch_names import local_watcher

from conftest import MPI_ENV, TESTS

watch_config.register()
# A syntactically valid connection string whose endpoints are a closed port on loopback.
FAKE_KEY = "5c1e7a3d-9b2f-4e6a-8d0c-3f7b1a9e2d64"


def environment(**extra: str) -> dict[str, str]:
    # The tests' own modules first, then whatever mpistyle this run imports (its checkout's src).
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **MPI_ENV, "PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> tuple[str, dict[str, float]]:
    """The endpoint's text, and its samples by name and labels (OpenTelemetry's scope labels aside)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if not k.startswith("otel_scope_"))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return text, samples


def watch_cfg(tmp_path: Path, *extra: str) -> DictConfig:
    with initialize_config_module("mpistyle.configs", version_base="1.3"):
        return compose("watch", overrides=local_overrides(tmp_path, *extra))


def test_a_watcher_ticking_in_a_loop_serves_true_figures_to_prometheus(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_video(inbox / "clip.mp4", frames=4, width=64, height=48)
    (inbox / "notes.mp4").write_text("this is not a video")  # the probe before any job quarantines it
    (inbox / "readme.txt").write_text("not a video name")  # quarantined unread
    make_video(inbox / "busy.mp4", frames=2, width=64, height=48)
    # Another watcher is at work on busy.mp4 (its claim's lease runs for an hour): it waits.
    busy = next(entry for entry in LocalArea("input", str(inbox)).list() if entry.name == "busy.mp4")
    key = job_name(busy.name, busy.etag)
    LocalArea("work", str(tmp_path / "work")).create_json(f"state/{key}.json", {
        "input": busy.name, "etag": busy.etag, "size": busy.size, "key": key, "job": None, "step": "claimed",
        "owner": "elsewhere:1", "lease_until": time.time() + 3600, "attempts": 0, "created": "2026-01-01T00:00:00+00:00",
        "history": [{"step": "claimed", "at": "2026-01-01T00:00:00+00:00"}],
    })
    port = free_port()
    watcher = subprocess.Popen(
        watch_command(*local_overrides(tmp_path, "every=0.5", f"metrics.prometheus_port={port}")),
        cwd=tmp_path, env=environment(), stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        samples: dict[str, float] = {}
        while samples.get("mpistyle_watch_videos_done_total") != 1 or sum(
            value for name, value in samples.items() if name.startswith("mpistyle_watch_videos_quarantined_total")
        ) != 2:
            assert watcher.poll() is None and time.monotonic() < deadline, samples
            time.sleep(0.2)
            try:
                _, samples = scrape(port)
            except OSError:
                samples = {}  # not serving yet
        # A few more ticks see the same videos done: nothing counts twice.
        ticks = samples["mpistyle_watch_tick_duration_seconds_count"]
        while samples["mpistyle_watch_tick_duration_seconds_count"] < ticks + 3:
            assert watcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
            text, samples = scrape(port)
    finally:
        watcher.send_signal(signal.SIGTERM)
        log = watcher.communicate(timeout=60)[1]
    assert watcher.returncode == 0 and "stopped" in log, log

    assert samples["mpistyle_watch_videos_claimed_total"] == 3  # busy.mp4 was claimed by the other watcher
    assert samples['mpistyle_watch_videos_quarantined_total{reason="name"}'] == 1
    assert samples['mpistyle_watch_videos_quarantined_total{reason="input"}'] == 1
    assert samples["mpistyle_watch_attempts_total"] == 1  # clip.mp4 once; notes.mp4 never reached a job
    assert 'mpistyle_watch_failures_total{fault="input"}' not in samples
    assert samples.get("mpistyle_watch_errors_total", 0) == 0
    assert samples["mpistyle_job_duration_seconds_count"] == 1 and samples["mpistyle_job_duration_seconds_sum"] > 0
    report = json.loads((tmp_path / "outbox" / "clip.mp4.report.json").read_text())
    assert samples["mpistyle_job_duration_seconds_sum"] == pytest.approx(report["stages_s"]["total"])
    assert samples["mpistyle_job_frames_total"] == 4
    assert samples["mpistyle_job_throughput_per_second_count"] == 1
    assert samples["mpistyle_job_throughput_per_second_sum"] == pytest.approx(report["fps"]["end_to_end"])
    assert {state: samples[f'mpistyle_watch_queue_depth{{state="{state}"}}'] for state in QUEUED_STATES} == {
        state: 1 if state == "busy" else 0 for state in QUEUED_STATES
    }
    assert samples["mpistyle_watch_jobs_active"] == 0
    # No series names a video: neither its name nor anything from its path.
    assert not any(word in text for word in ("clip", "notes", "readme", "busy.mp4", str(tmp_path)))
    assert states(tmp_path / "work")["busy.mp4"]["owner"] == "elsewhere:1"  # left alone


class FailingRunner(Runner):
    """Every job, a video's own or a batch's, fails at once with exit 1 (a bug, which may be the
    input's doing)."""

    def start(self, job: JobSpec) -> str:
        return f"failing:{job.name}"

    def poll(self, handle: str, job: JobSpec) -> JobStatus:
        return JobStatus("failed", 1)


def test_attempts_and_failures_are_counted_per_video_in_a_batch_and_alone(tmp_path: Path) -> None:
    """Ticks of a watcher in this process whose jobs all fail: the batch's failure is held
    against neither video, then each runs alone until max_attempts quarantines it."""
    reader = InMemoryMetricReader()
    watcher = local_watcher(tmp_path, "max_batch=2", "max_attempts=2", runner=FailingRunner())
    watcher.metrics = WatchMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    for name in ("a.mp4", "b.mp4"):  # real videos: every input is probed before its job
        make_video(tmp_path / "inbox" / name, frames=2, width=32, height=24)

    def figures() -> dict[str, float]:
        found = {}
        data = reader.get_metrics_data()
        assert data is not None
        for metric in (m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics):
            for point in metric.data.data_points:
                labels = ",".join(f"{k}={v}" for k, v in sorted(point.attributes.items()))
                value = point.count if hasattr(point, "count") else point.value  # a histogram: how many
                found[f"{metric.name}{{{labels}}}" if labels else metric.name] = value
        return found

    expected = [  # after each tick: (attempts, failures, videos failed and waiting, quarantined)
        (2, 2, 2, 0),  # one batch job for both
        (4, 4, 2, 0),  # each alone: its first attempt held against it
        (6, 6, 0, 2),  # each alone again: max_attempts
    ]
    for attempts, failures, failed, quarantined in expected:
        watcher.tick()
        found = figures()
        assert found["mpistyle.watch.attempts"] == attempts
        assert found["mpistyle.watch.failures{fault=attempt}"] == failures
        assert found["mpistyle.watch.queue.depth{state=failed}"] == failed
        assert found.get("mpistyle.watch.videos.quarantined{reason=attempts}", 0) == quarantined
        assert found["mpistyle.watch.jobs.active"] == 0
    assert found["mpistyle.watch.videos.claimed"] == 2 and "mpistyle.watch.videos.done" not in found


# Every connection the watcher process opens, printed as it happens: the audit hook sees the
# Azure SDK's sockets as well as ours.
_AUDITED_WATCH = (
    "import sys\n"
    "def audit(event, args):\n"
    "    if event == 'socket.connect':\n"
    "        print('AUDIT connect', args[1], file=sys.stderr, flush=True)\n"
    "    elif event == 'socket.getaddrinfo':\n"
    "        print('AUDIT resolve', args[0], file=sys.stderr, flush=True)\n"
    "sys.addaudithook(audit)\n"
    "from mpistyle.watch.watcher import main; main()\n"
)


def test_azure_monitor_comes_from_the_environment_and_its_string_shows_nowhere(tmp_path: Path) -> None:
    closed = free_port()
    connection = (f"InstrumentationKey={FAKE_KEY};IngestionEndpoint=http://127.0.0.1:{closed}/;"
                  f"LiveEndpoint=http://127.0.0.1:{closed}/")
    dump = tmp_path / "job-env.json"
    overrides = local_overrides(
        tmp_path, f"job_overrides=['~model','+model._target_=frame_models.dump_env','+model.path={dump}']",
    )
    make_video(tmp_path / "inbox" / "clip.mp4", frames=2, width=64, height=48)
    (tmp_path / "inbox" / "readme.txt").write_text("not a video name")
    done = subprocess.run(
        [sys.executable, "-c", _AUDITED_WATCH, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=environment(**{AZURE_MONITOR_VARIABLE: connection}),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any("exporting to Azure Monitor" in line for line in lines), done.stderr
    tick = next(number for number, line in enumerate(lines) if "tick: 1 done, 1 quarantined" in line)
    network = [(number, line) for number, line in enumerate(lines) if line.startswith("AUDIT")]
    # Nothing reaches for the network while the watcher starts and ticks; as it stops, it pushes
    # its figures to the configured endpoint (refused here) and goes nowhere else.
    assert network and all(number > tick for number, _ in network), done.stderr
    assert {line for _, line in network} <= {"AUDIT resolve 127.0.0.1", f"AUDIT connect ('127.0.0.1', {closed})"}
    handed = json.loads(dump.read_text())
    assert AZURE_MONITOR_VARIABLE not in handed  # the job never gets it
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    for secret in (FAKE_KEY, connection):
        assert secret not in done.stdout + done.stderr
        assert not any(secret in text for text in written)


def test_settings_that_cannot_work_are_refused_and_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="every=60"):  # a tick alone lives too short to be scraped
        watch_config.check(watch_cfg(tmp_path, "metrics.prometheus_port=9464"))
    for bad in ("every=0", "metrics.prometheus_port=70000", "metrics.export_interval_s=0"):
        with pytest.raises(ConfigError):
            watch_config.check(watch_cfg(tmp_path, "every=60", bad))
    with pytest.raises(ConfigError, match="a credential"):
        watch_config.check(watch_cfg(tmp_path, f"runner.env_pass=[{AZURE_MONITOR_VARIABLE}]"))

    with socket.socket() as taken:  # the port is someone else's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            with exported(watch_cfg(tmp_path, "every=60", f"metrics.prometheus_port={port}")):
                pass

    broken = "InstrumentationKey=not-a-uuid-Zq8Lm3;IngestionEndpoint=http://127.0.0.1:9/"
    monkeypatch.setenv(AZURE_MONITOR_VARIABLE, broken)
    with pytest.raises(ConfigError, match=AZURE_MONITOR_VARIABLE) as refused:
        with exported(watch_cfg(tmp_path)):
            pass
    assert "Zq8Lm3" not in str(refused.value)
    assert "Zq8Lm3" not in redact(f"connection: {broken}; again: InstrumentationKey={FAKE_KEY};")
    assert FAKE_KEY not in redact(f"InstrumentationKey={FAKE_KEY};IngestionEndpoint=x")
