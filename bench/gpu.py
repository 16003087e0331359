"""The GPU figures, at 1080p: model only (per precision, eager and compiled, and where its time
goes: a profile and variants of the model's arithmetic), decode only (NVDEC and the CPU), encode
only (x264 on the node's cores, NVENC where the GPU has one), and the default command end to end
on a 30 s clip with 1 and 2 ranks, and beside the loop a user would write instead
(``bench/naive_loop.py``) on a one-keyframe clip and a broadcast-style one (MPEG-2 in open GOPs,
AC-3, MPEG-TS). Run by ``bench/gpu.sh``, which installs what the machine lacks and runs the GPU
tests first.

The steps run in the order of the ``STEPS`` table, the ones most wanted first: when the budget
runs out, the opt-in paths are the ones left out.

    python bench/gpu.py OUT/gpu.json --budget-s 420
    python bench/gpu.py OUT/gpu.json --dry-run      # every step on the CPU, tiny: the script works

Each step runs in its own process with a time limit, and the JSON file is rewritten after each,
so a step that fails or runs out of time costs only its own figures (``errors``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


# The steps, each run as `python bench/gpu.py --step NAME --work DIR`: returns its figures.


def step_machine(args: argparse.Namespace) -> dict[str, Any]:
    import ctypes.util

    import av
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "pyav": av.__version__, "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)), "cuda_available": torch.cuda.is_available(),
        "gpu_codecs": sorted(name for name in av.codecs_available if name.endswith(("_cuvid", "_nvenc"))),
        # The driver's video libraries (a container may lack them: NVIDIA_DRIVER_CAPABILITIES=video).
        "driver_libraries": {lib: ctypes.util.find_library(lib) for lib in ("cuda", "nvcuvid", "nvidia-encode")},
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                     capability=f"{properties.major}.{properties.minor}", gpus=torch.cuda.device_count())
    return facts


def step_clip(args: argparse.Namespace) -> dict[str, Any]:
    from mpistyle.sample import make_video

    size = _size(args)
    started = time.perf_counter()
    # A user's kind of clip: x264's own keyframe interval (250 frames), B-frames, AAC.
    make_video(_clip(args), frames=args.seconds * 30, width=size[0], height=size[1], fps=30, gop=250, bframes=3,
               processes=len(os.sched_getaffinity(0)))
    return {"path": _clip(args).name, "frames": args.seconds * 30, "size": f"{size[0]}x{size[1]}", "fps": 30,
            "made_in_s": round(time.perf_counter() - started, 1)}


def step_model(args: argparse.Namespace, compiled: bool = False) -> dict[str, Any]:
    """The scorer a job uses (uint8 frames in and out of host memory), batch 8 on a GPU, and the
    model alone on frames already on the device: the gap is the copies and conversions."""
    import numpy as np
    import torch

    from mpistyle.devices import pick_device
    from mpistyle.scoring import default_batch_size

    device = pick_device("auto", 0)
    width, height = _size(args)
    batch = default_batch_size(device)
    frames = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    rounds = 3 if args.dry_run else 12
    figures = []
    for precision in ["bf16"] if compiled else ["fp32", "bf16", "fp16"]:
        figures.append(_model_run(device, frames, precision, compiled, rounds))
        print(json.dumps(figures[-1]), file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(device), "size": f"{width}x{height}", "runs": figures}


def _model_run(device: Any, frames: Any, precision: str, compiled: bool, rounds: int) -> dict[str, Any]:
    import torch

    from mpistyle.model.loading import load_multistyle
    from mpistyle.scoring import Scorer

    batch, height, width = frames.shape[:3]
    started = time.perf_counter()
    scorer = Scorer(load_multistyle(), device, batch, precision, compile_model=compiled)
    how = scorer.prepare(height, width)
    figure: dict[str, Any] = {
        "precision": precision, "kernels": scorer.kernels, "prepare": how,
        "prepare_s": round(time.perf_counter() - started, 1), "batch": batch,
        "frames_per_s": _rate(lambda: scorer(frames), batch, rounds, device),
    }
    if compiled:
        return figure
    if device.type == "cuda" and precision == "fp32":  # once: what copying a batch costs
        figure["copy_ms_per_batch"] = _copies(frames, device)
    model, x = scorer.eager, torch.rand(batch, 3, height, width, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=scorer.dtype, enabled=scorer.dtype is not None):
        figure["on_device_frames_per_s"] = _rate(lambda: model(x), batch, rounds, device)
        if device.type == "cuda" and precision == "bf16":
            for size in (4, 16, 32):  # batches sized to the GPU
                xs = torch.rand(size, 3, height, width, device=device)
                fps = _rate(lambda xs=xs: model(xs), size, max(2, rounds * 8 // size), device)
                figure[f"on_device_batch_{size}_frames_per_s"] = fps
                del xs
    return figure  # other arrangements of the arithmetic (channels_last, cudnn.benchmark, ...): step_variants


def step_model_compiled(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 compiled (on a GPU in the process, on a CPU ahead of time): ``prepare_s`` is the
    compile's time, cold."""
    return step_model(args, compiled=True)


def step_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Every frame of the clip to RGB in host memory, as a rank gets it: the CPU decoder (all
    the node's cores) and NVDEC."""
    import torch

    from mpistyle.hwcodecs import pick_decoder
    from mpistyle.segment import Segment
    from mpistyle.video import decode_segment, probe

    info = probe(str(_clip(args)))
    whole = Segment(0, 0, info.frames, None)
    runs = []
    decoders: list[Any] = [None]  # None: the CPU's
    if torch.cuda.is_available():
        try:
            decoders.append(pick_decoder("cuvid", info, torch.device("cuda", 0)))
        except Exception as err:  # no NVDEC here: the CPU's figure still counts
            runs.append({"decoder": "cuvid", "error": str(err)})
    for cuvid in decoders:
        started = time.perf_counter()
        count = sum(1 for _ in decode_segment(info, whole, cuvid=cuvid))
        seconds = time.perf_counter() - started
        runs.append({"decoder": cuvid.name if cuvid else info.codec, "frames": count, "frames_per_s": round(count / seconds, 1)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return {"runs": runs}


def step_encode(args: argparse.Namespace) -> dict[str, Any]:
    """The segment encoder on styled frames, as a job's encoder gets them (their texture costs
    x264 about three times what the clip's own frames do): the encoder the default command uses
    here (``default``: beside a GPU, NVENC where it opens, else x264 at ``video.gpu_preset``),
    x264 at the CPU's defaults (8 threads, preset medium), faster presets and all the cores."""
    from dataclasses import replace

    import numpy as np
    import torch

    from mpistyle.encode import EncodeSettings, SegmentEncoder
    from mpistyle.hwcodecs import beside_gpu, on_nvenc, pick_encoder
    from mpistyle.segment import Segment
    from mpistyle.video import decode_segment, probe

    info = probe(str(_clip(args)))
    count = min(info.frames, 30 if args.dry_run else 150)
    frames = _styled(np.stack(list(decode_segment(info, Segment(0, 0, count, None)))))
    cores = len(os.sched_getaffinity(0))
    default = EncodeSettings()
    gpu = torch.device("cuda", 0)
    nvenc = pick_encoder(default, info, gpu, "mp4") if torch.cuda.is_available() else None
    here = default  # what the default command encodes with on this machine
    if nvenc:
        here = on_nvenc(default, nvenc, gpu)
    elif torch.cuda.is_available():
        here = beside_gpu(default)
    settings = [("default", here)] + ([("cpu default", default)] if here != default else [])
    settings += [("", replace(default, threads=cores))]
    settings += [("", replace(default, preset=preset, threads=cores)) for preset in ("fast", "veryfast", "superfast")]
    if nvenc:
        settings += [("", on_nvenc(replace(default, nvenc_preset="p1"), nvenc, gpu))]
    runs = []
    for role, setting in settings:
        started = time.perf_counter()
        encoder = SegmentEncoder(info, setting, 0, "mp4")
        size = sum(len(p.data) for p in encoder.encode(frames)) + sum(len(p.data) for p in encoder.finish())
        seconds = time.perf_counter() - started
        runs.append({"role": role or None, "encoder": setting.codec, "preset": setting.preset or setting.options.get("preset"),
                     "threads": setting.threads, "frames_per_s": round(count / seconds, 1),
                     "kbit_per_s": round(size * 8 / 1000 / (count / 30), 0)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return {"frames": count, "nvenc": nvenc, "runs": runs}


def _styled(frames: Any) -> Any:
    """``frames`` through the default model on this machine's device, 8 at a time."""
    import numpy as np

    from mpistyle.devices import pick_device, pick_precision
    from mpistyle.model.loading import load_multistyle
    from mpistyle.scoring import Scorer

    device = pick_device("auto", 0)
    scorer = Scorer(load_multistyle(), device, 8, pick_precision("auto", device))
    return np.concatenate([scorer(frames[first : first + 8]) for first in range(0, len(frames), 8)])


def _end_to_end(args: argparse.Namespace, ranks: int, *overrides: str, clip: Path | None = None) -> dict[str, Any]:
    """The default command, whole, as a user types it (process start and model load included)."""
    out = Path(args.work) / f"{args.step}.mp4"
    command = [sys.executable, "-m", "mpistyle", f"input={clip or _clip(args)}", f"output={out}", *overrides]
    if args.dry_run:
        command.append("device=cpu")
    if ranks > 1:
        command = [shutil.which("mpirun") or "mpirun", "-n", str(ranks), *command]
    env = {**os.environ, **MPI_ENV, "MPISTYLE_RUNS_DIR": str(Path(args.work) / "runs")}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.limit_s)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
    report = json.loads(Path(f"{out}.report.json").read_text())
    frames = report["frames"]
    return {
        "ranks": ranks, "overrides": list(overrides), "seconds": round(seconds, 1), "frames_per_s": round(frames / seconds, 1),
        "frames": frames, "stages_s": report.get("stages_s"),
        "per_rank": [{k: r.get(k) for k in ("device", "precision", "compiled", "decoder", "encoder", "frames", "seconds")}
                     for r in report["per_rank"]],
    }


def step_e2e_1(args: argparse.Namespace) -> dict[str, Any]:
    return _end_to_end(args, 1)


def step_e2e_2(args: argparse.Namespace) -> dict[str, Any]:
    return _end_to_end(args, 2)


def step_e2e_compiled(args: argparse.Namespace) -> dict[str, Any]:
    return _end_to_end(args, 1, "compile=true")


def step_e2e_cuvid(args: argparse.Namespace) -> dict[str, Any]:
    return _end_to_end(args, 1, "video.decoder=cuvid")


def step_user_clips(args: argparse.Namespace) -> dict[str, Any]:
    """Inputs users have, 10 s each with sound: one keyframe (x264's default interval is longer
    than most uploads), and a broadcast-style file (MPEG-2 in open GOPs of 15 with B-frames at
    29.97 fps, AC-3, MPEG-TS, as FFmpeg's own encoders write it), made from the first."""
    from mpistyle.sample import make_video
    from mpistyle.video import probe

    width, height = _size(args)
    frames = (2 if args.dry_run else 10) * 30
    started = time.perf_counter()
    one_keyframe = make_video(_user_clip(args, "1gop"), frames=frames, width=width, height=height, fps=30, gop=100_000,
                              bframes=3, processes=len(os.sched_getaffinity(0)))
    broadcast = _broadcast(one_keyframe, _user_clip(args, "open_gop_ts"))
    clips = {}
    for path in (one_keyframe, broadcast):
        info = probe(str(path))
        clips[path.name] = {"codec": info.codec, "frames": info.frames, "keyframes": len(info.keyframe_pts)}
    return {"clips": clips, "size": f"{width}x{height}", "made_in_s": round(time.perf_counter() - started, 1)}


def _broadcast(source: Path, target: Path) -> Path:
    """``source`` as MPEG-2 video in open GOPs (B-frames before each keyframe that need the GOP
    before: FFmpeg's mpeg2video default) at 29.97 fps with AC-3 stereo sound, in MPEG-TS."""
    from fractions import Fraction

    import av

    rate = Fraction(30000, 1001)
    with av.open(str(source)) as inp, av.open(str(target), "w") as out:
        picture = inp.streams.video[0]
        video = out.add_stream("mpeg2video", rate=rate)
        video.width, video.height, video.pix_fmt = picture.width, picture.height, "yuv420p"
        video.bit_rate = 15_000_000  # a broadcast contribution rate
        video.codec_context.options = {"bf": "2", "g": "15"}
        audio = out.add_stream("ac3", rate=48000)
        audio.layout = "stereo"
        for index, frame in enumerate(inp.decode(picture)):
            frame.pts, frame.time_base = index, 1 / rate
            frame.pict_type = av.video.frame.PictureType.NONE  # the source's picture types would force the GOPs
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        inp.seek(0)
        for sound in inp.decode(inp.streams.audio[0]):
            out.mux(audio.encode(sound))  # PyAV resamples to AC-3's format and frame size
        out.mux(audio.encode(None))
    return target


def _beside_reference(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The default command (one rank, as typed) and the loop a user would write instead
    (``bench/naive_loop.py``), on the same clip, one after the other, each timed whole."""
    clip = _user_clip(args, kind)
    default = _end_to_end(args, 1, clip=clip)
    out = Path(args.work) / f"{args.step}-reference.mp4"
    command = [sys.executable, str(REPO / "bench" / "naive_loop.py"), str(clip), str(out)]
    if args.dry_run:
        command += ["--device", "cpu"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(10.0, args.limit_s - default["seconds"]))
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the reference loop: exit {done.returncode}: {done.stderr[-1500:]}")
    frames = json.loads(done.stdout.strip().splitlines()[-1])["frames"]
    reference = {"seconds": round(seconds, 1), "frames": frames, "frames_per_s": round(frames / seconds, 1)}
    return {"clip": clip.name, "default_command": default, "reference": reference,
            "default_vs_reference": round(default["frames_per_s"] / reference["frames_per_s"], 2)}


def step_vs_reference_1gop(args: argparse.Namespace) -> dict[str, Any]:
    return _beside_reference(args, "1gop")


def step_vs_reference_open_gop_ts(args: argparse.Namespace) -> dict[str, Any]:
    return _beside_reference(args, "open_gop_ts")


def step_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Where a batch's time goes, at the precision a job picks here: the scorer as a job calls
    it (uint8 frames from host memory and back), under torch's profiler. The busiest operators
    (with their input shapes, so a slow layer can be told from the others) and kernels, and how
    much of the wall time the device was busy."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from mpistyle.devices import pick_device, pick_precision
    from mpistyle.model.loading import load_multistyle
    from mpistyle.scoring import Scorer, default_batch_size

    device = pick_device("auto", 0)
    width, height = _size(args)
    batch = default_batch_size(device)
    frames = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    scorer = Scorer(load_multistyle(), device, batch, pick_precision("auto", device))
    scorer.prepare(height, width)
    for _ in range(2):
        scorer(frames)
    on_gpu = device.type == "cuda"
    rounds = 3
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])], record_shapes=True) as prof:
        for _ in range(rounds):
            scorer(frames)
    wall_ms = (time.perf_counter() - started) * 1000 / rounds

    def device_us(event: Any, total: bool = False) -> float:
        names = ("device_time_total", "cuda_time_total") if total else ("self_device_time_total", "self_cuda_time_total")
        return float(next((getattr(event, n) for n in names if hasattr(event, n)), 0.0))

    def row(event: Any, us: float) -> dict[str, Any]:
        return {"name": event.key[:90], "shapes": str(event.input_shapes)[:160], "calls": round(event.count / rounds, 1),
                "ms_per_batch": round(us / 1000 / rounds, 2)}

    events = prof.key_averages(group_by_input_shape=True)
    kernels = [e for e in events if on_gpu and str(e.device_type).endswith("CUDA")]
    operators = [e for e in events if e.key.startswith("aten::")]
    time_of = (lambda e: device_us(e, total=True)) if on_gpu else (lambda e: float(e.cpu_time_total))
    busy_ms = sum(device_us(e) for e in kernels) / 1000 / rounds
    return {
        "device": str(device), "precision": scorer.precision, "batch": batch, "size": f"{width}x{height}",
        "wall_ms_per_batch": round(wall_ms, 1), "frames_per_s": round(batch * 1000 / wall_ms, 1),
        "device_busy_ms_per_batch": round(busy_ms, 1) if on_gpu else None,
        "operators": [row(e, time_of(e)) for e in sorted(operators, key=time_of, reverse=True)[:15]],
        "kernels": [row(e, device_us(e)) for e in sorted(kernels, key=device_us, reverse=True)[:12]],
    }


def step_variants(args: argparse.Namespace) -> dict[str, Any]:
    """The model on frames already on the device, in other arrangements of its arithmetic than a
    job's: how fast, and how close (PSNR in dB against fp32 without TF32) on the clip's frames.
    Which one would take the default model towards 300 frames/s at 1080p is what this asks."""
    import copy

    import numpy as np
    import torch

    from mpistyle.devices import pick_device
    from mpistyle.model.loading import load_multistyle
    from mpistyle.scoring import default_batch_size
    from mpistyle.segment import Segment
    from mpistyle.video import decode_segment, probe

    device = pick_device("auto", 0)
    info = probe(str(_clip(args)))
    batch = default_batch_size(device) if device.type == "cuda" else 2
    frames = np.stack(list(decode_segment(info, Segment(0, 0, batch, None))))
    x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float().div(255).contiguous()
    base = load_multistyle().to(device).eval()
    rounds = 2 if args.dry_run else 10
    half, last, plain = torch.bfloat16, torch.channels_last, torch.contiguous_format
    variants = [  # the first is the reference the others' PSNR is measured against
        Variant("fp32, no TF32 (the reference)", tf32=False),
        Variant("fp32, TF32 convolutions (torch's default)"),
        Variant("fp32, channels_last", lambda m: m.to(memory_format=last), layout=last),
        Variant("bf16 autocast (a job's default)", autocast=half),
        Variant("bf16 autocast, cudnn.benchmark", autocast=half, benchmark=True),
        Variant("bf16 autocast, channels_last", lambda m: m.to(memory_format=last), layout=last, autocast=half),
        Variant("fp16 autocast", autocast=torch.float16),
        Variant("bf16 autocast, layers under 16 channels in fp32", _thin_layers_in_fp32, autocast=half),
        Variant("bf16 weights and activations, no autocast", lambda m: m.to(half), dtype=half),
        Variant("bf16 weights, channels_last, no autocast", lambda m: m.to(half).to(memory_format=last), half, last),
    ]
    runs, reference = [], None
    for variant in variants:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = variant.tf32, variant.benchmark
        model = variant.change(copy.deepcopy(base))
        xs = x.to(variant.dtype or torch.float32).contiguous(memory_format=variant.layout or plain)
        autocast = variant.autocast
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or half, enabled=autocast is not None):
            out = model(xs).float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
            fps = _rate(lambda model=model, xs=xs: model(xs), batch, rounds, device)
        reference = out if reference is None else reference
        runs.append({"variant": variant.name, "frames_per_s": fps, "psnr_db": _psnr(reference, out)})  # null: the same pixels
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        del model, xs
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = True, False
    return {"device": str(device), "batch": batch, "size": f"{info.width}x{info.height}", "runs": runs}


class Variant(NamedTuple):
    """One arrangement of the model's arithmetic for ``step_variants``."""

    name: str
    change: Callable[[Any], Any] = lambda model: model  # the model as changed (a copy)
    dtype: Any = None  # the input's dtype (None: fp32)
    layout: Any = None  # the input's memory format (None: contiguous)
    autocast: Any = None  # autocast's dtype (None: off)
    tf32: bool = True  # torch.backends.cudnn.allow_tf32
    benchmark: bool = False  # torch.backends.cudnn.benchmark


def _thin_layers_in_fp32(model: Any) -> Any:
    """``model`` with every layer whose weight has fewer than 16 input or output channels run
    outside autocast, in fp32 (tensor cores gain nothing on 3, 4 or 8 channels)."""
    import torch

    for module in model.modules():
        weight = getattr(module, "w", None)
        weight = weight if isinstance(weight, torch.Tensor) else getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4 and min(weight.shape[:2]) < 16:
            module.forward = _in_fp32(module.forward)
    return model


def _in_fp32(forward: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    def run(x: Any, *rest: Any) -> Any:
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float(), *(r.float() if isinstance(r, torch.Tensor) else r for r in rest))

    return run


def _psnr(a: Any, b: Any) -> float | None:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * np.log10(255.0**2 / mse), 1)


STEPS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], float]] = {
    # name: (step, the seconds it may take at most), the most wanted first
    "machine": (step_machine, 60),
    "clip": (step_clip, 120),
    "model": (step_model, 120),
    "profile": (step_profile, 90),
    "e2e_1": (step_e2e_1, 150),
    "user_clips": (step_user_clips, 90),
    "vs_reference_1gop": (step_vs_reference_1gop, 150),
    "vs_reference_open_gop_ts": (step_vs_reference_open_gop_ts, 150),
    "e2e_2": (step_e2e_2, 150),
    "encode": (step_encode, 120),
    "decode": (step_decode, 90),
    "variants": (step_variants, 120),
    "model_compiled": (step_model_compiled, 240),
    "e2e_compiled": (step_e2e_compiled, 150),
    "e2e_cuvid": (step_e2e_cuvid, 150),
}


CUDA_ONLY = frozenset({"e2e_cuvid"})  # left out of a dry run


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 17's goals on one H100 at 1080p, from what was measured."""
    def best(step: str, key: str, **match: Any) -> float | None:
        runs = results.get(step, {}).get("runs", [])
        values = [r[key] for r in runs if key in r and all(r.get(k) == v for k, v in match.items())]
        return max(values) if values else None

    model = max((v for v in (best("model", "frames_per_s", precision="bf16"),
                              best("model_compiled", "frames_per_s")) if v), default=None)
    decode = best("decode", "frames_per_s")
    encode = best("encode", "frames_per_s", role="default")  # the encoder the default command uses here
    e2e = max((results[s]["frames_per_s"] for s in ("e2e_1", "e2e_2") if s in results), default=None)
    slowest = min((v for v in (model, decode, encode) if v), default=None)
    return {
        "model_bf16_frames_per_s": model, "model_goal_300": None if model is None else model >= 300,
        "slowest_stage_alone_frames_per_s": slowest, "end_to_end_frames_per_s": e2e,
        "end_to_end_vs_slowest_stage": None if not (e2e and slowest) else round(e2e / slowest, 2),
        **{f"default_vs_reference_{kind}": results.get(f"vs_reference_{kind}", {}).get("default_vs_reference")
           for kind in ("1gop", "open_gop_ts")},
    }


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"commit": commit or None, "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                               "dry_run": args.dry_run, "errors": {}}
    if args.tests_log and Path(args.tests_log).exists():
        lines = Path(args.tests_log).read_text(errors="replace").strip().splitlines()
        results["tests"] = {"summary": lines[-1] if lines else "", "log": Path(args.tests_log).name}
    for name, (_, limit) in STEPS.items():
        if args.steps and name not in args.steps.split(","):
            continue
        if args.dry_run and name in CUDA_ONLY:
            continue
        left = deadline - time.monotonic()
        if left < 20:
            results["errors"][name] = "skipped: out of time"
            continue
        command = [sys.executable, __file__, str(out), "--step", name, "--work", str(work), "--seconds", str(args.seconds),
                   "--limit-s", str(min(limit, left))] + (["--dry-run"] if args.dry_run else [])
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=min(limit, left))
            if done.returncode != 0:
                results["errors"][name] = done.stderr[-2000:]
            else:
                results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(done.stderr[-3000:], end="", flush=True)
        except subprocess.TimeoutExpired as err:
            results["errors"][name] = f"timed out after {min(limit, left):.0f} s"
            print(_text(err.stderr)[-3000:], end="", flush=True)
        print(f"== {name}: {time.perf_counter() - started:.1f} s{' FAILED' if name in results['errors'] else ''}", flush=True)
        results["goals"] = goals(results)
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results.get("goals"), indent=1))
    return 1 if results["errors"] else 0


def _copies(frames: Any, device: Any) -> dict[str, float]:
    """Milliseconds to copy a uint8 batch to the GPU and back, from ordinary and from pinned memory."""
    import torch

    figures = {}
    for pinned in (False, True):
        host = torch.from_numpy(frames)
        host = host.pin_memory() if pinned else host
        back = torch.empty_like(host).pin_memory() if pinned else torch.empty_like(host)

        def there_and_back(host: Any = host, back: Any = back) -> None:
            back.copy_(host.to(device, non_blocking=True), non_blocking=True)

        figures["pinned" if pinned else "pageable"] = round(1000 / _rate(there_and_back, 1, 10, device), 2)
    return figures


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _clip(args: argparse.Namespace) -> Path:
    return Path(args.work) / "clip.mp4"


def _user_clip(args: argparse.Namespace, kind: str) -> Path:
    return Path(args.work) / ("clip-1gop.mp4" if kind == "1gop" else "clip-open-gop.ts")


def _size(args: argparse.Namespace) -> tuple[int, int]:
    return (160, 90) if args.dry_run else (1920, 1080)


def _rate(call: Callable[[], Any], batch: int, rounds: int, device: Any) -> float:
    import torch

    for _ in range(2):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(batch * rounds / (time.perf_counter() - started), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, at 160x90: check the script, measure nothing")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting steps after this long")
    parser.add_argument("--seconds", type=int, default=30, help="the clip's length")
    parser.add_argument("--steps", help="only these steps, comma-separated (default: all)")
    parser.add_argument("--tests-log", help="the GPU tests' log: its summary line goes into the JSON")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--limit-s", type=float, default=150, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Not beside the JSON: the GPU machine returns that folder's few files, not clips.
    args.work = args.work or str(Path(tempfile.gettempdir()) / "mpistyle-gpu-work")
    work = Path(args.work)
    # Every step and job keeps its compiled kernels here, not in the user's cache: a job compiled
    # after the model step loads that step's package, as a user's second job would.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work.absolute() / "compile-cache")
    if args.step is None:
        if args.dry_run:
            args.seconds = min(args.seconds, 4)
        return run_all(args)
    print(json.dumps(STEPS[args.step][0](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
