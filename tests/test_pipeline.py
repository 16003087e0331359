"""The whole job in this process (one rank), against real files."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from mpistyle import pipeline
from mpistyle.errors import ConfigError, InputError, JobStopped, ModelError, OutputError
from mpistyle.pipeline import run
from mpistyle.plan import Plan, make_plan
from mpistyle.report import RankFacts, SegmentDone, StageTimer, rank_summary
from mpistyle.scoring import Scorer, build_scorer
from mpistyle.segment import Segment
from mpistyle.worker import Video, Worker, score_segments

from media import audio_packets, decode_all, keyframe_flags, open_gop_ts, stream_summary

Cfg = Callable[..., DictConfig]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Anything a finished or failed job must not leave beside its output."""
    return sorted(p.name for p in directory.rglob("*") if "partial" in p.name or p.suffix == ".h5")


def test_restyles_every_frame_with_timestamps_and_audio(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=30, width=96, height=54, gop=6)
    before = digest(source)
    output = tmp_path / "out.mp4"
    report = run(cfg(f"input={source}", f"output={output}"))

    frames_in, times_in = decode_all(source)
    frames_out, times_out = decode_all(output)
    assert len(frames_out) == len(frames_in) == 30
    assert times_out == pytest.approx(times_in, abs=1e-6)
    assert frames_out[0].shape == (54, 96, 3)
    # Styled, not copied: the default style changes the picture a lot.
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(frames_in, frames_out)]) > 20
    assert audio_packets(output) == audio_packets(source)
    assert stream_summary(output) == [("video", "h264"), ("audio", "aac")]
    assert digest(source) == before

    on_disk = json.loads((tmp_path / "out.mp4.report.json").read_text())
    assert on_disk["frames"] == report["frames"] == 30
    assert on_disk["output"]["audio"] == [{"stream": 1, "codec": "aac", "action": "copied"}]
    assert on_disk["ranks"] == 1 and on_disk["devices"] == ["cpu"]
    assert set(on_disk["stages_s"]) >= {"probe", "load_model", "score", "join", "total"}
    assert on_disk["fps"]["end_to_end"] > 0
    assert (tmp_path / "out.mp4.preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(tmp_path) == []
    assert not (tmp_path / ".mpistyle-staging").exists()


@pytest.mark.parametrize("source_name, output_name", [("in.mkv", "out.mp4"), ("in.mov", "out.mkv"), ("in.mp4", "out.mov")])
def test_containers(video: Callable[..., Path], cfg: Cfg, tmp_path: Path, source_name: str, output_name: str) -> None:
    source = video(source_name, frames=12)
    output = tmp_path / output_name
    run(cfg(f"input={source}", f"output={output}", "report.preview_frames=0"))
    frames, times = decode_all(output)
    source_times = decode_all(source)[1]
    assert len(frames) == 12
    # Matroska cannot store the negative start of AAC priming, so the muxer shifts the whole
    # timeline (audio with it) by those few ms; the frame timing itself is unchanged.
    shift = times[0] - source_times[0] if output.suffix == ".mkv" else 0.0
    assert 0 <= shift < 0.03
    # Matroska keeps milliseconds.
    assert times == pytest.approx([t + shift for t in source_times], abs=6e-4 if output.suffix == ".mkv" else 1e-6)
    assert audio_packets(output) == audio_packets(source)


def test_generic_model_by_target(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=10, width=64, height=48)
    output = tmp_path / "inverted.mp4"
    run(cfg(f"input={source}", f"output={output}", "+model._target_=frame_models.invert", "~model", "video.crf=0"))
    for a, b in zip(decode_all(source)[0], decode_all(output)[0]):
        assert np.abs((255 - a.astype(int)) - b).mean() < 3


def test_odd_sides_are_padded_not_stretched(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    # H.264 4:2:0 needs even sides: a 63x47 input is stored as 64x48, the picture unmoved.
    source = tmp_path / "odd.mkv"
    from mpistyle.sample import make_video

    make_video(source, frames=6, width=63, height=47, codec="libx264rgb", pix_fmt="rgb24")
    output = tmp_path / "odd-out.mp4"
    run(cfg(f"input={source}", f"output={output}", "~model", "+model._target_=frame_models.invert", "video.crf=0"))
    frames_in, _ = decode_all(source)
    frames_out, _ = decode_all(output)
    assert frames_out[0].shape == (48, 64, 3)
    for a, b in zip(frames_in, frames_out):
        assert np.abs((255 - a.astype(int)) - b[:47, :63]).mean() < 4


def test_rotation_metadata_is_kept(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video("phone.mp4", frames=6, width=64, height=48, rotation=90)
    output = tmp_path / "phone-out.mp4"
    run(cfg(f"input={source}", f"output={output}", "report.preview_frames=0"))
    with av.open(str(output)) as container:
        frame = next(container.decode(video=0))
    assert (frame.width, frame.height) == (64, 48) and frame.rotation == 90


def test_no_audio_and_two_audio_tracks(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    silent = video("silent.mp4", frames=8, audio=0)
    run(cfg(f"input={silent}", f"output={tmp_path / 'silent-out.mp4'}", "report.preview_frames=0"))
    assert stream_summary(tmp_path / "silent-out.mp4") == [("video", "h264")]
    assert len(decode_all(tmp_path / "silent-out.mp4")[0]) == 8

    two = video("two.mkv", frames=8, audio=2)
    run(cfg(f"input={two}", f"output={tmp_path / 'two-out.mkv'}", "report.preview_frames=0"))
    assert audio_packets(tmp_path / "two-out.mkv") == audio_packets(two)
    assert len(audio_packets(two)) == 2


def test_variable_frame_rate_is_kept(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    pts = [0, 1, 2, 4, 7, 8, 12, 13, 20, 21, 22, 30]
    source = video("vfr.mkv", frames=len(pts), pts=pts, time_base=Fraction(1, 24), gop=4)
    output = tmp_path / "vfr-out.mp4"
    run(cfg(f"input={source}", f"output={output}", "report.preview_frames=0"))
    times = decode_all(output)[1]
    assert times == pytest.approx(decode_all(source)[1], abs=1e-6)
    assert times == pytest.approx([p / 24 for p in pts], abs=6e-4)  # the source is Matroska: ms


def test_staged_frames_are_reused_by_the_same_job(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=12)
    first = run(cfg(f"input={source}", f"output={tmp_path / 'a.mp4'}", "staging.keep=true"))
    assert first["frames_reused"] == 0 and Path(first["staging"]).is_dir()
    second = run(cfg(f"input={source}", f"output={tmp_path / 'b.mp4'}"))
    assert second["frames_reused"] == 12
    assert all(np.array_equal(x, y) for x, y in zip(decode_all(tmp_path / "a.mp4")[0], decode_all(tmp_path / "b.mp4")[0]))
    # A different style is a different job: nothing reused.
    third = run(cfg(f"input={source}", f"output={tmp_path / 'c.mp4'}", "model.style=3"))
    assert third["frames_reused"] == 0


def test_only_missing_segments_are_scored_again(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=24, gop=6)
    per_gop = "video.segment_seconds=0"
    first = run(cfg(f"input={source}", f"output={tmp_path / 'a.mp4'}", "staging.keep=true", per_gop))
    staged = sorted(Path(first["staging"]).glob("segment-*.h5"))
    assert len(staged) == 4 and first["output"]["segments"] == 4  # one segment per GOP
    staged[1].unlink()
    staged[3].rename(staged[3].with_name(staged[3].name + ".partial"))  # as a killed writer leaves it
    second = run(cfg(f"input={source}", f"output={tmp_path / 'b.mp4'}", per_gop))
    assert second["frames_reused"] == 12
    assert all(np.array_equal(x, y) for x, y in zip(decode_all(tmp_path / "a.mp4")[0], decode_all(tmp_path / "b.mp4")[0]))
    assert digest(tmp_path / "a.mp4") == digest(tmp_path / "b.mp4")


def test_segments_are_whole_gops_of_at_least_the_given_length(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=50, gop=6, fps=24)  # GOPs of 0.25 s: 8 full ones and a 2-frame one
    report = run(cfg(f"input={source}", f"output={tmp_path / 'a.mp4'}", "staging.keep=true", "video.segment_seconds=0.6"))
    names = sorted(p.name for p in Path(report["staging"]).glob("segment-*.h5"))
    # 3 GOPs (0.75 s) make the first segment that lasts 0.6 s; the tail is what is left.
    assert names == [f"segment-{a:09d}-{b:09d}.h5" for a, b in ((0, 18), (18, 36), (36, 50))]
    keyframes = [i for i, key in enumerate(keyframe_flags(tmp_path / "a.mp4")) if key]
    assert keyframes == [0, 18, 36]  # each segment opens with a keyframe, none in between
    assert len(decode_all(tmp_path / "a.mp4")[0]) == 50


def test_compiled_model_scores_like_the_eager_one(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=3, width=32, height=24)
    lossless = ["video.codec=libx264rgb", "video.pix_fmt=rgb24", "video.crf=0"]  # the output is the scored frames
    lossless.append("precision=fp32")  # bf16's rounding differs more between fused and eager kernels
    eager = run(cfg(f"input={source}", f"output={tmp_path / 'eager.mkv'}", *lossless))
    compiled = run(cfg(f"input={source}", f"output={tmp_path / 'compiled.mkv'}", "compile=true", *lossless))
    assert compiled["frames_reused"] == 0 and eager["frames_reused"] == 0  # compiled frames are another job's
    eager_frames, compiled_frames = (np.stack(decode_all(tmp_path / f)[0]).astype(int) for f in ("eager.mkv", "compiled.mkv"))
    difference = np.abs(eager_frames - compiled_frames)
    assert difference.max() <= 2 and difference.mean() < 0.01


def test_blend_and_codec_settings(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=6)
    output = tmp_path / "blend.mp4"
    overrides = ["model.blend={3: 0.5, 19: 0.5}", "video.codec=libx265", "video.crf=28", "video.preset=ultrafast"]
    report = run(cfg(f"input={source}", f"output={output}", *overrides))
    assert stream_summary(output)[0] == ("video", "hevc")
    assert report["model"]["blend"] == {3: 0.5, 19: 0.5}


def test_report_and_preview_paths_and_progress_bar(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=9)
    report_path, preview_path = tmp_path / "reports" / "job.json", tmp_path / "p.png"
    overrides = [f"report.path={report_path}", f"report.preview={preview_path}", "report.preview_frames=3", "report.progress=bar"]
    run(cfg(f"input={source}", f"output={tmp_path / 'out.mp4'}", *overrides))
    assert json.loads(report_path.read_text())["frames"] == 9
    assert preview_path.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out.mp4.report.json").exists() and not (tmp_path / "out.mp4.preview.png").exists()


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (["input=/nonexistent.mp4"], InputError, "not found"),
        (["model.style=31"], ConfigError, "unknown style 31"),
        (["batch_size=0"], ConfigError, "batch_size"),
        (["device=tpu"], ConfigError, "device"),
        (["model=transformer_net", "model.checkpoint=/nonexistent.pth"], ModelError, "not found"),
        (["~model", "+model._target_=frame_models.half_width"], ModelError, "keep the shape"),
        # The reason, not only Hydra's heading ("Error loading 'no.such.module':").
        (["~model", "+model._target_=no.such.module"], ConfigError, "cannot build the model .*No module named 'no'"),
    ],
)
def test_errors_leave_nothing_behind(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path, overrides: list[str], error: type, words: str
) -> None:
    source = video(frames=6)
    before = digest(source)
    output = tmp_path / "out.mp4"
    args = [f"input={source}", f"output={output}", *overrides]
    with pytest.raises(error, match=words) as raised:
        run(cfg(*args))
    assert "\n" not in str(raised.value)
    assert not output.exists()
    assert leftovers(tmp_path) == []
    assert digest(source) == before


@pytest.mark.parametrize(
    "override, words",
    [
        ("video.preset=warpspeed", "refuses these video settings"),
        ("video.pix_fmt=bogus", "refuses"),
        ("video.codec=nosuch", "not an encoder"),
    ],
)
def test_bad_encoder_settings_fail_before_scoring(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path, override: str, words: str
) -> None:
    source = video(frames=4)
    with pytest.raises(ConfigError, match=words):
        run(cfg(f"input={source}", f"output={tmp_path / 'out.mp4'}", override))
    assert not (tmp_path / ".mpistyle-staging").exists()  # nothing was scored


def test_report_directory_is_created(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=4)
    report = tmp_path / "new" / "dir" / "job.json"
    run(cfg(f"input={source}", f"output={tmp_path / 'out.mp4'}", f"report.path={report}"))
    assert json.loads(report.read_text())["frames"] == 4


@pytest.mark.parametrize(
    "override, error, words",
    [
        ("report.preview={folder}", OutputError, "report.preview is a directory"),
        ("report.path={folder}", OutputError, "report.path is a directory"),
        ("report.preview={output}", ConfigError, "output and report.preview are the same file"),
        ("report.path={source}", ConfigError, "report.path is the input"),
    ],
)
def test_every_path_the_job_writes_is_checked_before_any_frame_is_scored(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path, override: str, error: type[Exception], words: str
) -> None:
    # An existing folder as the preview used to fail only after the whole video was written.
    source = video(frames=4)
    output = tmp_path / "out.mp4"
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(error, match=words):
        run(cfg(f"input={source}", f"output={output}", override.format(folder=folder, output=output, source=source)))
    assert not output.exists() and not (tmp_path / ".mpistyle-staging").exists()  # nothing was scored


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_refuses_writes_is_an_output_error_before_scoring(
    video: Callable[..., Path], cfg: Cfg
) -> None:
    # /proc passes access() for root but takes no new file: the staging folder beside the
    # output used to fail instead, as a staging problem (exit 6), not an output one (exit 4).
    source = video(frames=4)
    with pytest.raises(OutputError, match="cannot write in the output directory /proc"):
        run(cfg(f"input={source}", "output=/proc/x.mp4"))


def test_output_equal_to_input_is_refused(video: Callable[..., Path], cfg: Cfg) -> None:
    source = video(frames=4)
    with pytest.raises(ConfigError, match="output is the input"):
        run(cfg(f"input={source}", f"output={source}"))


def test_output_location_that_cannot_be_a_directory(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="output directory"):
        run(cfg(f"input={source}", f"output={blocker / 'out.mp4'}"))


def test_unknown_output_container(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=4)
    with pytest.raises(ConfigError, match="container"):
        run(cfg(f"input={source}", f"output={tmp_path / 'out.xyz'}"))


def test_thirty_videos_back_to_back(cfg: Cfg, tmp_path: Path) -> None:
    from mpistyle.sample import make_video

    staging = tmp_path / "staging"
    for index in range(30):
        source = make_video(tmp_path / f"v{index:02d}.mp4", frames=2 + index % 5, width=32, height=24, gop=2)
        output = tmp_path / "out" / f"v{index:02d}.mp4"
        report = run(cfg(f"input={source}", f"output={output}", f"staging.root={staging}", "report.preview_frames=0"))
        assert report["frames"] == len(decode_all(output)[0]) == 2 + index % 5
        assert report["frames_reused"] == 0
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 30
    assert not [p for p in staging.rglob("*") if p.is_file()]


def test_temporal_blend_lowers_the_warping_error_and_keeps_the_style(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    source = video(frames=24, width=128, height=72, fps=12, gop=6)  # the sample landscape pans
    lossless = ["video.codec=libx264rgb", "video.pix_fmt=rgb24", "video.crf=0", "report.preview_frames=0"]
    plain = run(cfg(f"input={source}", f"output={tmp_path / 'plain.mkv'}", "temporal.measure=true", *lossless))
    blend = ["temporal.alpha=0.5", "temporal.measure=true"]
    blended = run(cfg(f"input={source}", f"output={tmp_path / 'blend.mkv'}", *blend, *lossless))
    # Two 1-s segments, each a blend chain; the meters see all 23 pairs (one rank).
    assert plain["flicker"]["pairs"] == blended["flicker"]["pairs"] == 23
    assert plain["flicker"]["output"] == pytest.approx(plain["flicker"]["unblended"])
    assert blended["flicker"]["unblended"] == pytest.approx(plain["flicker"]["output"], rel=1e-6)
    assert blended["flicker"]["output"] < 0.5 * plain["flicker"]["output"]
    # Still the style: each blended frame is much nearer its own stylisation than the input.
    inputs = np.stack(decode_all(source)[0]).astype(float)
    styled, smooth = (np.stack(decode_all(tmp_path / name)[0]).astype(float) for name in ("plain.mkv", "blend.mkv"))
    assert np.abs(smooth - styled).mean() < 0.35 * np.abs(styled - inputs).mean()
    assert blended["frames_reused"] == 0  # blended frames are another job's than plain ones


def test_temporal_blend_gives_the_same_bits_after_a_resume(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=36, width=96, height=54, fps=12, gop=6)
    common = ["temporal.alpha=0.5", "video.segment_seconds=1", "report.preview_frames=0"]
    first = run(cfg(f"input={source}", f"output={tmp_path / 'first.mp4'}", "staging.keep=true", *common))
    assert first["output"]["segments"] == 3
    # The middle segment lost: it is blended again from its own start, as the first time.
    sorted(Path(first["staging"]).glob("segment-*.h5"))[1].unlink()
    again = run(cfg(f"input={source}", f"output={tmp_path / 'again.mp4'}", *common))
    assert again["frames_reused"] == 24
    assert digest(tmp_path / "first.mp4") == digest(tmp_path / "again.mp4")


def run_split(config: DictConfig, ranks: int) -> dict:
    """The pipeline's steps as ``ranks`` ranks could run them (plan, each rank's segments, the
    join), in this one process: rank ``r`` does segments ``r``, ``r + ranks``, ... (one of the
    ways an on-demand handout can fall). The split logic without mpirun (tests/test_cli.py runs
    the real thing)."""
    plan = make_plan(config)
    plan.staging.create()
    scorer = this_process_scorer(config, plan)
    video = this_process_video(config, plan, scorer, ranks)
    staged: list[SegmentDone] = []
    for rank in range(ranks):
        take = _handing_out(plan.segments[rank::ranks])
        worker = Worker([video], lambda frames: True, take, _keeping(staged), bool(config.overlap))
        score_segments(worker, rank)
    summaries = [rank_summary(facts, [s for s in staged if s.rank == facts.rank]) for facts in video.ranks]
    job = pipeline.Job(config, "split", StageTimer(), time.perf_counter())
    return pipeline.finish(job, plan, summaries, staged, time.perf_counter() - job.started)


def this_process_scorer(config: DictConfig, plan: Plan) -> Scorer:
    """The scorer the pipeline would build for ``plan`` as a node's only rank, on this process's CPUs."""
    info = plan.info
    return build_scorer(config, 0, frozenset(os.sched_getaffinity(0)), info.frames * info.width * info.height)


def this_process_video(config: DictConfig, plan: Plan, scorer: Scorer, ranks: int = 1) -> Video:
    """The one video of a queue, as ``ranks`` ranks in this process would hold it."""
    facts = [
        RankFacts(rank, "here", "cpu", scorer.threads, scorer.precision, scorer.compiled, bool(config.overlap),
                  plan.info.codec, plan.settings.codec, scorer.batch_size)
        for rank in range(ranks)
    ]
    return Video(plan, scorer, tuple(facts), config.on_damage)


def _handing_out(segments: Sequence[Segment]) -> Callable[[], tuple[int, int] | None]:
    """A rank's take: these segments (of the queue's one video), then None."""
    remaining = iter(segments)
    return lambda: next(((0, segment.number) for segment in remaining), None)


def _keeping(staged: list[SegmentDone]) -> Callable[[Any], None]:
    """A rank's note: each segment staged, kept (a failed video is an error here)."""
    def note(message: Any) -> None:
        assert isinstance(message, SegmentDone), message
        staged.append(message)
    return note


def test_segments_with_other_b_frame_delays_join_into_a_valid_stream(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    # A 1-frame segment between two longer ones, in AVI (one tick per frame): its encoder used
    # no B-frame delay, the next one did; the join used to fail with dts after pts.
    source = video("cuts.avi", frames=20, keyframes=[0, 6, 7], bframes=0, audio=0)
    for ranks in (1, 3):
        output = tmp_path / f"out{ranks}.mp4"
        run_split(cfg(f"input={source}", f"output={output}", "video.segment_seconds=0", "report.preview_frames=0"), ranks)
        with av.open(str(output)) as container:
            packets = [p for p in container.demux(container.streams.video[0]) if p.size]
        assert all(a.dts < b.dts for a, b in itertools.pairwise(packets))
        assert all(p.dts <= p.pts for p in packets)
        assert len(decode_all(output)[0]) == 20
    assert digest(tmp_path / "out1.mp4") == digest(tmp_path / "out3.mp4")


def test_matroska_output_is_the_same_file_every_time(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=12)
    for name in ("a.mkv", "b.mkv"):
        run(cfg(f"input={source}", f"output={tmp_path / name}", "report.preview_frames=0"))
    assert digest(tmp_path / "a.mkv") == digest(tmp_path / "b.mkv")  # no random Matroska UIDs


def _damage_keyframe(source: Path, gop: int, target: Path) -> Path:
    """A copy of ``source`` whose ``gop``-th keyframe is garbage after its first bytes."""
    with av.open(str(source)) as container:
        keys = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size and p.is_keyframe]
    position, size = keys[gop]
    data = bytearray(source.read_bytes())
    data[position + 12 : position + size] = bytes([0xFF]) * (size - 12)
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("bframes", [0, 2])
def test_one_keyframe_keeps_every_rank_busy_and_gives_the_same_file_for_any_split(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path, bframes: int
) -> None:
    # x264's default keyframe interval is 250 frames: many uploads hold one keyframe.
    source = video(frames=60, fps=12, gop=1000, bframes=bframes, width=64, height=48)
    digests = set()
    for ranks in (1, 2, 3):
        output = tmp_path / f"out{ranks}.mp4"
        report = run_split(cfg(f"input={source}", f"output={output}", "report.preview_frames=0"), ranks)
        assert report["output"]["segments"] >= 3 and all(rank["segments"] for rank in report["per_rank"])
        assert 1 < report["decoded_per_scored"] <= 8
        digests.add(digest(output))
        assert audio_packets(output) == audio_packets(source)
    assert len(digests) == 1
    frames, _ = decode_all(tmp_path / "out1.mp4")
    assert len(frames) == 60


def test_a_resume_inside_a_long_gop_reuses_the_segments_staged(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=60, fps=12, gop=1000, width=64, height=48)
    common = [f"input={source}", "report.preview_frames=0"]
    first = run(cfg(*common, f"output={tmp_path / 'a.mp4'}", "staging.keep=true"))
    staged = sorted(Path(first["staging"]).glob("segment-*.h5"))
    staged[1].unlink()  # lost: a segment cut mid-GOP, decoded again from the keyframe
    start, stop = (int(part) for part in staged[1].stem.split("-")[1:])
    again = run(cfg(*common, f"output={tmp_path / 'b.mp4'}"))
    assert start > 0 and again["frames_reused"] == 60 - (stop - start)
    assert digest(tmp_path / "a.mp4") == digest(tmp_path / "b.mp4")


def test_open_gop_mpeg_ts_with_ac3_is_restyled_the_same_for_any_split(cfg: Cfg, tmp_path: Path) -> None:
    source = open_gop_ts(tmp_path / "broadcast.ts")
    digests = set()
    for ranks in (1, 2):
        output = tmp_path / f"out{ranks}.mkv"
        config = cfg(f"input={source}", f"output={output}", "report.preview_frames=0", "video.segment_seconds=0")
        report = run_split(config, ranks)
        assert report["frames"] == 60 and report["damage"]["concealed"] == 0
        digests.add(digest(output))
    assert len(digests) == 1
    assert [kind for kind, _ in stream_summary(tmp_path / "out1.mkv")] == ["video", "audio"]


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_concealed_damage_gives_the_same_file_for_any_split(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path, overlap: str
) -> None:
    # FFmpeg conceals a damaged frame from the picture decoded before it: each segment must be
    # decoded from its own keyframe, or that picture depends on where a rank's share began.
    source = _damage_keyframe(video(frames=24, gop=6, width=96, height=54, audio=0), 2, tmp_path / "bad.mp4")
    digests = set()
    for ranks in (1, 2, 3):
        output = tmp_path / f"out{ranks}.mp4"
        config = cfg(
            f"input={source}", f"output={output}", "video.segment_seconds=0", "report.preview_frames=0", f"overlap={overlap}"
        )
        report = run_split(config, ranks)
        assert report["damage"]["damaged"] + report["damage"]["concealed"] + report["damage"]["packet_errors"] > 0
        digests.add(digest(output))
    assert len(digests) == 1


def test_damage_is_reported_after_a_resume_and_another_policy_does_not_reuse_it(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    source = _damage_keyframe(video(frames=24, gop=6, width=96, height=54, audio=0), 2, tmp_path / "bad.mp4")
    common = [f"input={source}", "video.segment_seconds=0", "report.preview_frames=0"]
    first = run(cfg(*common, f"output={tmp_path / 'a.mp4'}", "staging.keep=true"))
    again = run(cfg(*common, f"output={tmp_path / 'b.mp4'}", "staging.keep=true"))
    assert again["frames_reused"] == 24 and again["damage"] == first["damage"]
    assert first["damage"]["damaged"] + first["damage"]["concealed"] + first["damage"]["packet_errors"] > 0
    with pytest.raises(InputError, match="damaged"):  # not the concealed segments staged above
        run(cfg(*common, f"output={tmp_path / 'c.mp4'}", "on_damage=fail"))


def test_temporal_options_refuse_frames_too_small_for_optical_flow(video: Callable[..., Path], cfg: Cfg, tmp_path: Path) -> None:
    source = video(frames=4, width=16, height=8)
    for option in ("temporal.alpha=0.5", "temporal.measure=true"):
        with pytest.raises(ConfigError, match="at least 12 pixels"):
            run(cfg(f"input={source}", f"output={tmp_path / 'out.mp4'}", option))
    run(cfg(f"input={source}", f"output={tmp_path / 'out.mp4'}", "report.preview_frames=0"))  # without them: fine


def test_overlap_threads_give_the_same_file_as_one_step_after_another(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    source = video(frames=30, gop=6)
    for overlap in ("false", "true"):
        output = tmp_path / f"out-{overlap}.mp4"
        config = cfg(f"input={source}", f"output={output}", f"overlap={overlap}", "temporal.alpha=0.5", "temporal.measure=true")
        report = run(config)
        assert report["per_rank"][0]["overlap"] is (overlap == "true")
        assert report["per_rank"][0]["seconds"]["waited"] >= 0
    assert digest(tmp_path / "out-false.mp4") == digest(tmp_path / "out-true.mp4")
    # On CPU the default runs the steps in turn (the threads took cores from the model), a frame at a time.
    default = run(cfg(f"input={source}", f"output={tmp_path / 'default.mp4'}"))["per_rank"][0]
    assert default["overlap"] is False and default["batch"] == 1


@pytest.mark.parametrize("stop_after, kept", [(9, 1), (12, 2)])
def test_a_stop_with_overlap_keeps_the_segments_scored_whole(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path, stop_after: int, kept: int
) -> None:
    source = video(frames=24, gop=6)
    common = [f"input={source}", "video.segment_seconds=0", "report.preview_frames=0"]
    config = cfg(*common, f"output={tmp_path / 'a.mp4'}", "overlap=true")
    plan = make_plan(config)
    scorer = this_process_scorer(config, plan)
    plan = replace(plan, staging=plan.staging.scored_with(scorer.kernels))  # as the pipeline does
    plan.staging.create()
    seen = 0

    def tick(frames: int) -> bool:  # as if another rank failed once this many frames were done
        nonlocal seen
        seen += frames
        return seen < stop_after

    video = this_process_video(config, plan, scorer)
    with pytest.raises(JobStopped):
        score_segments(Worker([video], tick, _handing_out(plan.segments), _keeping([]), overlap=True), 0)
    # Stopped inside the second segment (frame 9) or right after it (frame 12): every segment
    # scored whole is staged, the one cut short is not, and no partial file is left.
    staged = sorted(p.name for p in plan.staging.dir.iterdir())
    assert staged == [plan.staging.path(segment).name for segment in plan.segments[:kept]]
    resumed = run(config)
    assert resumed["frames_reused"] == 6 * kept
    assert run(cfg(*common, f"output={tmp_path / 'b.mp4'}", "overlap=false"))["frames_reused"] == 0
    assert digest(tmp_path / "a.mp4") == digest(tmp_path / "b.mp4")


def test_a_torchscript_model_runs_as_saved_and_the_report_says_so(
    video: Callable[..., Path], cfg: Cfg, tmp_path: Path
) -> None:
    # Autocast does not reach inside TorchScript: precision=auto must not claim bf16 for it.
    class Invert(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1.0 - x

    checkpoint = tmp_path / "invert.pt"
    torch.jit.save(torch.jit.script(Invert()), checkpoint)
    source = video(frames=4)
    common = [f"input={source}", "model=torchscript", f"model.checkpoint={checkpoint}", "report.preview_frames=0"]
    report = run(cfg(*common, f"output={tmp_path / 'out.mp4'}"))
    assert [(r["precision"], r["compiled"]) for r in report["per_rank"]] == [("fp32", False)]
    with pytest.raises(ConfigError, match="precision=bf16 cannot apply to a TorchScript model"):
        run(cfg(*common, f"output={tmp_path / 'bf16.mp4'}", "precision=bf16"))
