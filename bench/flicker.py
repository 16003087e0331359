"""Flicker of the default style model with and without the temporal blend, and what the optical
flow costs. Makes its own clips (nothing to download), prints tables, optionally writes JSON.

    python bench/flicker.py                       # 640x360, 24 frames, both scenes
    python bench/flicker.py --frames 12 --size 320x180 --json flicker.json

Scenes: ``landscape`` (mpistyle.sample: hills scrolling at three speeds and a moving ball, so
parallax and occlusions) and ``pan`` (a camera pan over scikit-image's bundled astronaut photo,
skipped without scikit-image). E_warp is the warping error of Lai et al. (mpistyle.flicker):
[0, 1] pixels, squared differences averaged over RGB, lower is steadier. "input" is the metric's
floor on that clip (the unstylised frames: what flow and interpolation errors alone give).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from mpistyle.flicker import FlickerMeter
from mpistyle.flow import FLOW_PRESETS, FlowEstimator, PairFlows, to_gray
from mpistyle.model.loading import load_multistyle
from mpistyle.sample import landscape
from mpistyle.temporal import TemporalStage


def landscape_clip(frames: int, width: int, height: int) -> np.ndarray:
    return np.stack([landscape(index, width, height, fps=24.0) for index in range(frames)])


def pan_clip(frames: int, width: int, height: int) -> np.ndarray | None:
    try:
        from skimage import data
    except ImportError:
        return None
    # Scale the photo so the window can move 3 px right and 1 px down per frame inside it.
    photo = data.astronaut()
    scale = max((width + 3 * frames + 2) / photo.shape[1], (height + frames + 2) / photo.shape[0])
    photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.stack([photo[t : t + height, 3 * t : 3 * t + width] for t in range(frames)])


def stylise(frames: np.ndarray, style: int) -> np.ndarray:
    net = load_multistyle(style=style)
    out = []
    with torch.inference_mode():
        for frame in frames:
            x = torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255.0)
            out.append(net(x).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return np.stack(out)


def run_stage(inputs: np.ndarray, styled: np.ndarray, alpha: float, chunk: int) -> tuple[np.ndarray, FlickerMeter, float]:
    """Blend and measure as the pipeline would (chunks restart the blend; seams are measured)."""
    stage = TemporalStage(alpha=alpha, measure=True)
    outputs = []
    began = time.perf_counter()
    for start in range(0, len(inputs), chunk):
        stage.reset(contiguous=True)
        outputs.append(stage(inputs[start : start + chunk], styled[start : start + chunk]))
    seconds = time.perf_counter() - began
    assert stage.meter is not None
    return np.concatenate(outputs), stage.meter, seconds / len(inputs)


def flicker_table(name: str, inputs: np.ndarray, style: int, alphas: list[float], chunk: int) -> list[dict[str, Any]]:
    began = time.perf_counter()
    styled = stylise(inputs, style)
    model_s = (time.perf_counter() - began) / len(inputs)
    rows: list[dict[str, Any]] = []
    _, floor, _ = run_stage(inputs, inputs, 0.0, len(inputs))
    rows.append({"scene": name, "frames": "input", "alpha": None, "chunk": None, "e_warp": floor.value(),
                 "masked": floor.masked_fraction(), "mad_to_styled": None, "ms_per_frame": None})
    style_change = float(np.abs(styled.astype(np.float32) - inputs).mean())
    for alpha, chunk_frames in [(0.0, len(inputs))] + [(a, len(inputs)) for a in alphas] + [(a, chunk) for a in alphas]:
        outputs, meter, seconds = run_stage(inputs, styled, alpha, chunk_frames)
        rows.append({
            "scene": name, "frames": "styled" if alpha == 0.0 else "blended", "alpha": alpha,
            "chunk": chunk_frames if chunk_frames < len(inputs) else None,
            "e_warp": meter.value(), "masked": meter.masked_fraction(),
            "mad_to_styled": float(np.abs(outputs.astype(np.float32) - styled).mean()),
            "ms_per_frame": 1000 * seconds,
        })
    print(f"\n{name}: {len(inputs)} frames {inputs.shape[2]}x{inputs.shape[1]}, model {1000 * model_s:.0f} ms/frame, "
          f"the style changes the input by {style_change:.1f} grey levels on average")
    header = ("frames", "alpha", "chunk", "E_warp", "vs styled", "masked", "|out-styled|", "ms/frame")
    print("{:8} {:>5} {:>5} {:>9} {:>9} {:>7} {:>12} {:>9}".format(*header))
    styled_e = next(r["e_warp"] for r in rows if r["frames"] == "styled")
    for r in rows:
        cells = (r["frames"], _cell(r["alpha"], ".1f"), _cell(r["chunk"], "d"), _cell(r["e_warp"], ".5f"),
                 _cell(r["e_warp"] / styled_e, ".2f"), _cell(r["masked"], ".3f"), _cell(r["mad_to_styled"], ".1f"),
                 _cell(r["ms_per_frame"], ".1f"))
        print("{:8} {:>5} {:>5} {:>9} {:>9} {:>7} {:>12} {:>9}".format(*cells))
    return rows


def _cell(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def flow_costs(inputs: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Milliseconds per flow and per frame pair (both flows and both masks) on one core."""
    gray = [to_gray(frame) for frame in inputs[:2]]
    rows = []
    candidates: dict[str, Any] = {name: FlowEstimator(name) for name in FLOW_PRESETS}
    candidates["farneback"] = lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    for name, flow in candidates.items():
        flow(*gray)  # warm-up
        began = time.perf_counter()
        for _ in range(repeats):
            flow(*gray)
        per_flow = (time.perf_counter() - began) / repeats
        began = time.perf_counter()
        for _ in range(repeats):
            pair = PairFlows(flow(gray[0], gray[1]), flow(gray[1], gray[0]))
            pair.forward_valid, pair.backward_valid  # noqa: B018 - computing the masks is the point
        per_pair = (time.perf_counter() - began) / repeats
        rows.append({"flow": name, "ms_per_flow": 1000 * per_flow, "ms_per_pair": 1000 * per_pair})
    print(f"\noptical flow at {inputs.shape[2]}x{inputs.shape[1]}, one OpenCV thread ({repeats} repeats)")
    print(f"{'flow':10} {'ms/flow':>8} {'ms/pair (2 flows + masks)':>26}")
    for r in rows:
        print(f"{r['flow']:10} {r['ms_per_flow']:8.1f} {r['ms_per_pair']:26.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT (default 640x360)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--style", type=int, default=19)
    parser.add_argument("--alphas", default="0.3,0.5,0.7")
    parser.add_argument("--chunk", type=int, default=12, help="frames per chunk for the restarted rows (a GOP)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    alphas = [float(a) for a in args.alphas.split(",")]
    results: dict[str, Any] = {"size": [width, height], "frames": args.frames, "style": args.style, "threads": args.threads}
    scenes = {"landscape": landscape_clip(args.frames, width, height), "pan": pan_clip(args.frames, width, height)}
    results["flicker"] = []
    for name, clip in scenes.items():
        if clip is None:
            print(f"\n{name}: skipped (needs scikit-image)")
            continue
        results["flicker"] += flicker_table(name, clip, args.style, alphas, args.chunk)
    cv2.setNumThreads(1)
    results["flow"] = flow_costs(scenes["landscape"], args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
