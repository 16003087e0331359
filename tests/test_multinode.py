"""`sbatch slurm/style.sbatch` across several Slurm nodes, each in its own network namespace
(tests/slurm_nodes.py): ranks on different nodes talk over TCP, the staging area is on the one
shared filesystem, and a node can die mid-job.

Every job must write the same file, byte for byte, as one rank alone on the same input.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cyclecloud_slurm_conf import power_saving_settings, slurm_conf_settings
from mpistyle.sample import make_video
from slurm_nodes import SlurmNodes
from test_watch import local_overrides, run_watch, starts, states

from conftest import MPI_ENV, TESTS, run_mpistyle, served
from media import decode_all

SCRIPT = TESTS.parent / "slurm" / "style.sbatch"
CYCLECLOUD_TEMPLATE = TESTS.parent / "cyclecloud" / "mpistyle-slurm.txt"
pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.slow]
# A clip long enough to lose a node in the middle of: 10 segments of 12 frames, scored by a model
# that takes 0.4 s a batch of 4 (and inverts): each rank works about 6 s, asleep, whatever the
# machine's speed, so that a node is lost mid-job every time and the CPUs stay free.
LONG = {"frames": 120, "width": 160, "height": 90, "gop": 4}
SLOW = ["~model", "+model._target_=frame_models.slow", "+model.seconds=0.4", "batch_size=4"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """The file one rank alone writes for an input and overrides (each run once per module)."""
    done: dict[tuple[Path, tuple[str, ...]], bytes] = {}

    def output(source: Path, *overrides: str) -> bytes:
        if (source, overrides) not in done:
            folder = tmp_path_factory.mktemp("alone")
            result = run_mpistyle(f"input={source}", f"output={folder / 'out.mp4'}", f"staging.root={folder / 'staging'}",
                                  "report.preview_frames=0", *overrides, cwd=folder)
            assert result.returncode == 0, result.stderr
            done[source, overrides] = (folder / "out.mp4").read_bytes()
        return done[source, overrides]

    return output


def alone_slow(alone: Callable[..., bytes], source: Path) -> bytes:
    """What one rank writes with the slow model, without its sleep (the same pictures)."""
    return alone(source, *SLOW[:2], "+model.seconds=0", SLOW[3])


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("clip") / "long.mp4", **LONG)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("clip") / "short.mp4", frames=48, gop=4)


def job_env(tmp_path: Path, launcher: str = "srun") -> dict[str, str]:
    return {
        **MPI_ENV,
        "MPISTYLE_PYTHON": sys.executable,
        "MPISTYLE_STAGING": str(tmp_path / "staging"),
        "MPISTYLE_LAUNCHER": launcher,
        "PYTHONPATH": str(TESTS),
    }


def submit(
    nodes: SlurmNodes, tmp_path: Path, source: Path, *flags: str, launcher: str = "srun", overrides: list[str] | None = None
) -> int:
    return nodes.sbatch(*flags, str(SCRIPT), f"input={source}", f"output={tmp_path / 'out.mp4'}", "report.preview_frames=0",
                        *(overrides or []), cwd=tmp_path, env=job_env(tmp_path, launcher))


def job_log(tmp_path: Path, job: int) -> str:
    return (tmp_path / f"mpistyle-{job}.out").read_text()


def rank_hosts(log: str) -> dict[int, str]:
    """Each rank's node, as the ranks log it ("rank 1/4 on n2: cpu, ...")."""
    return {int(rank): host for rank, host in re.findall(r"INFO rank (\d+)/\d+ on (\S+):", log)}


def staged_frames(tmp_path: Path) -> int:
    """Frames in finished segment files (segment-<first>-<stop>.h5; partial files never count)."""
    total = 0
    for path in (tmp_path / "staging").glob("*/segment-*.h5"):
        first, stop = re.fullmatch(r"segment-(\d+)-(\d+)\.h5", path.name).groups()
        total += int(stop) - int(first)
    return total


def staged_frames_under(folder: Path) -> int:
    """Staged frames of every video folder in ``folder`` (the watcher's workdir/<key>/staging)."""
    return sum(staged_frames(staging.parent) for staging in folder.glob("*/staging"))


def hosts(cluster: SlurmNodes, nodelist: str) -> list[str]:
    """A Slurm host list (``n[1,3-4]``) as names."""
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def hold_when_pending(cluster: SlurmNodes, job: int, timeout: float = 60) -> None:
    """Hold a requeued job as soon as it is pending again, so that nothing starts it while the
    test looks at what its first run left (``scontrol release`` lets it go)."""
    deadline = time.monotonic() + timeout
    while cluster.job(job)["JobState"] != "PENDING":
        assert time.monotonic() < deadline, f"job {job} still {cluster.job(job)['JobState']}, not pending again"
        time.sleep(0.2)
    cluster.run("scontrol", "hold", str(job))


def wait_for_staged(tmp_path: Path, nodes: SlurmNodes, job: int, frames: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while staged_frames(tmp_path) < frames:
        assert time.monotonic() < deadline, f"nothing staged; job {nodes.job(job).get('JobState')}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("launcher", "flags"),
    [
        ("srun", ("--nodes=2", "--ntasks-per-node=1")),
        ("srun", ("--nodes=3", "--ntasks-per-node=2")),
        ("mpirun", ("--nodes=2", "--ntasks-per-node=1")),
    ],
    ids=["srun-2x1", "srun-3x2", "mpirun-2x1"],
)
def test_ranks_on_several_nodes_write_the_same_file_as_one_rank(
    nodes: SlurmNodes, short_clip: Path, alone: Callable[..., bytes], tmp_path: Path,
    launcher: str, flags: tuple[str, ...],
) -> None:
    job = submit(nodes, tmp_path, short_clip, *flags, launcher=launcher)
    info = nodes.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    count, per_node = (int(flag.split("=")[1]) for flag in flags)
    hosts = rank_hosts(log)
    assert len(hosts) == count * per_node, log
    assert sorted(set(hosts.values())) == nodes.names[:count]  # every node ran ranks
    assert (tmp_path / "out.mp4").read_bytes() == alone(short_clip)
    assert json.loads((tmp_path / "out.mp4.report.json").read_text())["ranks"] == count * per_node


def test_a_node_lost_mid_job_is_requeued_and_the_job_finishes_on_the_others(
    nodes: SlurmNodes, long_clip: Path, alone: Callable[..., bytes], tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    job = submit(nodes, tmp_path, long_clip, "--nodes=2", "--ntasks-per-node=1", overrides=SLOW)
    wait_for_staged(tmp_path, nodes, job, frames=24)
    lost = nodes.names[1]  # the second node of the job's n[1-2]
    assert nodes.job(job)["NodeList"] == "n[1-2]"
    staged_at_kill = staged_frames(tmp_path)
    killed = time.monotonic()
    nodes.kill_node(lost)
    info = nodes.wait(job, timeout=240)
    finished = time.monotonic()
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1"
    assert lost not in hosts(nodes, info["NodeList"]) and nodes.node_state(lost).startswith("down")
    assert (tmp_path / "out.mp4").read_bytes() == alone_slow(alone, long_clip)
    report = json.loads((tmp_path / "out.mp4.report.json").read_text())
    assert report["frames_reused"] >= staged_at_kill > 0
    record_property("kill_to_output_s", round(finished - killed, 1))
    print(f"\nnode {lost} killed with {staged_at_kill}/{LONG['frames']} frames staged: the requeued job "
          f"finished on {info['NodeList']} {finished - killed:.1f} s later, reusing {report['frames_reused']} frames")
    # The node comes back by itself once its slurmd does (ReturnToService=2).
    nodes.start_node(lost)
    nodes.wait_node(lost, {"idle"})


def test_scontrol_requeue_of_a_running_job_resumes_without_scoring_finished_segments_again(
    nodes: SlurmNodes, long_clip: Path, alone: Callable[..., bytes], tmp_path: Path
) -> None:
    # A preemption drill: what Slurm does to a job when a higher-priority one (PreemptMode=REQUEUE)
    # or an operator takes its nodes.
    job = submit(nodes, tmp_path, long_clip, "--nodes=2", "--ntasks-per-node=1", overrides=SLOW)
    wait_for_staged(tmp_path, nodes, job, frames=24)
    nodes.run("scontrol", "requeue", str(job))
    # The ranks finish the batch in hand and exit; the job waits to be started again.
    hold_when_pending(nodes, job)
    wait_for(lambda: not any(nodes.busy(node) for node in nodes.names[:2]), 60)
    staged = staged_frames(tmp_path)  # everything the first run finished
    nodes.run("scontrol", "release", str(job))
    info = nodes.wait(job, timeout=240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert (tmp_path / "out.mp4").read_bytes() == alone_slow(alone, long_clip)
    report = json.loads((tmp_path / "out.mp4.report.json").read_text())
    # Scored twice: only what was in flight when the signal came (never a finished segment).
    assert report["frames_reused"] == staged > 0
    print(f"\nrequeued with {staged}/{LONG['frames']} frames staged; the second run reused all {staged}")


def test_the_watcher_submits_again_a_job_whose_node_died_without_holding_it_against_the_video(
    nodes: SlurmNodes, long_clip: Path, alone: Callable[..., bytes], tmp_path: Path
) -> None:
    watch = local_overrides(tmp_path, "runner=slurm", "runner.sbatch_args=['--nodes=2','--ntasks-per-node=1']",
                            "retry_backoff_s=1", f"job_overrides=[{','.join(repr(o) for o in SLOW)},'report.preview_frames=0']")
    shutil.copy(long_clip, tmp_path / "inbox" / "clip.mp4")
    env = {**nodes.env(), "MPISTYLE_PYTHON": sys.executable}
    first = run_watch(tmp_path, *watch, env=env)
    assert first.returncode == 0 and "started as slurm:" in first.stderr, first.stderr
    job = int(states(tmp_path / "work")["clip.mp4"]["job"].removeprefix("slurm:"))
    scratch = tmp_path / "scratch"
    deadline = time.monotonic() + 120
    while staged_frames_under(scratch) < 24:
        assert time.monotonic() < deadline, f"nothing staged; job {nodes.job(job).get('JobState')}"
        time.sleep(0.1)
    nodes.kill_node(nodes.names[1])
    # Slurm ends the job (the watcher submits with --no-requeue); a later tick submits it again.
    assert nodes.wait(job, timeout=120)["JobState"] == "NODE_FAIL"
    deadline = time.monotonic() + 240
    while states(tmp_path / "work")["clip.mp4"]["step"] != "done":
        assert time.monotonic() < deadline, states(tmp_path / "work")
        time.sleep(1)
        tick = run_watch(tmp_path, *watch, env=env)
        assert tick.returncode == 0, tick.stderr
    record = states(tmp_path / "work")["clip.mp4"]
    assert starts(record) == 2 and record["attempts"] == 0 and record["retries"] == 1
    assert "NODE_FAIL" in record["failure"]
    assert (tmp_path / "outbox" / "clip.mp4").read_bytes() == alone_slow(alone, long_clip)
    assert json.loads((tmp_path / "outbox" / "clip.mp4.report.json").read_text())["frames_reused"] >= 24


def test_a_batch_over_three_nodes_with_one_lost_delivers_every_video_once_on_the_three_left(
    nodes: SlurmNodes, video: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    sources = [video(f"in/{index}.mp4", frames=36, width=128, height=72, gop=4, start=index * 50) for index in range(6)]
    outputs = [tmp_path / "out" / f"{index}.mp4" for index in range(6)]
    jobs = tmp_path / "jobs.jsonl"
    lines = [json.dumps({"input": str(source), "output": str(output)}) for source, output in zip(sources, outputs, strict=True)]
    jobs.write_text("\n".join(lines) + "\n")
    job = nodes.sbatch("--nodes=3", "--ntasks-per-node=1", str(SCRIPT), f"inputs={jobs}", "report.preview_frames=0", *SLOW,
                       cwd=tmp_path, env=job_env(tmp_path))
    deadline = time.monotonic() + 180
    while not any(output.exists() for output in outputs):
        assert time.monotonic() < deadline, f"nothing delivered; job {nodes.job(job).get('JobState')}"
        time.sleep(0.1)
    assert nodes.job(job)["NodeList"] == "n[1-3]"
    nodes.kill_node(nodes.names[1])
    # What the first run delivered: its ranks on the nodes left go on until Slurm ends the job.
    wait_for(lambda: nodes.job(job)["Restarts"] == "1", 120)
    hold_when_pending(nodes, job)
    wait_for(lambda: not any(nodes.busy(node) for node in ("n1", "n3")), 60)
    before = {output: output.stat().st_mtime_ns for output in outputs if output.exists()}
    nodes.run("scontrol", "release", str(job))
    info = nodes.wait(job, timeout=240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["NodeList"] == "n[1,3-4]", log
    assert len(before) < len(outputs), "the whole batch was done before the job was requeued"
    report = json.loads((tmp_path / "batch-report.json").read_text())
    statuses = {Path(video["output"]).name: video["status"] for video in report["per_video"]}
    # Each video delivered once: by the first run (and not again) or by the requeued one.
    for output in outputs:
        assert statuses[output.name] == ("delivered before" if output in before else "done"), statuses
        assert len(decode_all(output)[0]) == 36
    assert {output: output.stat().st_mtime_ns for output in before} == before


def test_autoscale_as_cyclecloud_sets_it_starts_nodes_for_a_job_and_stops_them_when_idle(
    video: Callable[..., Path], tmp_path: Path
) -> None:
    """Slurm's power saving with the settings the CycleCloud template produces (its autoscale),
    the times scaled down for a test; the resume, suspend and resume-fail programs start and
    stop node namespaces as CycleCloud's start and deallocate VMs."""
    settings = power_saving_settings(CYCLECLOUD_TEMPLATE)
    # And how it shows and reaches powered-down nodes: sinfo lists them, slurmctld talks to each.
    settings |= {key: slurm_conf_settings(CYCLECLOUD_TEMPLATE)[key] for key in ("PrivateData", "TreeWidth")}
    scaled = {"SuspendTime": "5", "SuspendTimeout": "5", "ResumeTimeout": "10"}
    assert scaled.keys() <= settings.keys() and "idle_on_node_suspend" in settings["SlurmctldParameters"]
    cluster = SlurmNodes(tmp_path / "cluster", count=3, power_saving=[f"{k}={scaled.get(k, v)}" for k, v in settings.items()])
    with served(cluster, "a Slurm cluster of network namespaces"):
        powered_down = {node: "idle~" for node in cluster.names}
        assert node_states(cluster) == powered_down
        assert not any(cluster.processes_on(node) for node in cluster.names)
        # A job for two nodes on a cluster with every node powered down, one of which will not
        # come up (a VM that never boots): two are started, n1 is given up at ResumeTimeout,
        # the job is requeued and a third node started for it.
        cluster.fail_resume("n1")
        source = video(frames=24, gop=4)
        submitted = time.monotonic()
        job = submit(cluster, tmp_path, source, "--nodes=2", "--ntasks-per-node=1")
        info = cluster.wait(job, timeout=180)
        ended = time.monotonic()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["NodeList"] == "n[2-3]", info
        assert len(decode_all(tmp_path / "out.mp4")[0]) == 24
        power = (tmp_path / "cluster" / "log" / "power.log").read_text()
        assert "resume n[1-2]" in power and "resume_fail n1" in power and "resume n3" in power, power
        # Idle for SuspendTime: powered down again, their slurmd and everything else gone.
        wait_for(lambda: node_states(cluster) == {**powered_down, "n1": "down~"}, 60)
        assert not any(map(cluster.processes_on, cluster.names))
        print(f"\nautoscale: a job sent to a powered-down cluster ran in {ended - submitted:.1f} s (one node failed to "
              f"start); its nodes were powered down {time.monotonic() - ended:.1f} s after it ended")
        # The node that failed stays down~, with the reason, until it is handed back to power
        # saving: what cyclecloud/slurm's return_to_idle cron job does (every 5 minutes) for a
        # down~ node whose VM is gone. The next job may then try it again.
        assert "ResumeTimeout" in cluster.run("sinfo", "-h", "-R", "-n", "n1", "-o", "%E").stdout
        cluster.run("scontrol", "update", "nodename=n1", "state=idle")
        wait_for(lambda: cluster.node_state("n1") == "idle~", 30)


def node_states(cluster: SlurmNodes) -> dict[str, str]:
    return dict(line.split() for line in cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.splitlines())


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not so after {timeout:.0f} s"
        time.sleep(0.5)
