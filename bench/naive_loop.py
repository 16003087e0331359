"""The reference a user would write on a GPU machine instead of mpistyle: one Python process,
every frame decoded by PyAV, stylised alone by the same PyTorch model (fp32, batch 1, on the
GPU), and encoded by x264 at its defaults (preset medium, crf 23), with the audio copied.

On the GPU machine there is no ffmpeg CLI, and onnxruntime's GPU build is too large to carry
along, so the CPU bench's reference (ffmpeg to JPEG, onnxruntime, ffmpeg back: bench/run.py)
cannot run there; this loop is what is left to a user with PyTorch and PyAV.

    python bench/naive_loop.py IN OUT.mp4 [--device cuda]    # prints a JSON line of figures
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import av
import numpy as np
import torch


def restyle(source: str, target: str, device: torch.device) -> dict[str, Any]:
    from mpistyle.model.loading import load_multistyle

    started = time.perf_counter()
    model = load_multistyle(style=19).to(device).eval()
    frames = 0
    with av.open(source) as inp, av.open(target, "w") as out:
        video_in = inp.streams.video[0]
        audio_in = list(inp.streams.audio)
        video = out.add_stream("libx264", rate=video_in.average_rate)
        video.width, video.height, video.pix_fmt = video_in.width, video_in.height, "yuv420p"
        audio = {stream.index: out.add_stream_from_template(stream) for stream in audio_in}
        for packet in inp.demux(video_in, *audio_in):
            if packet.stream.type == "audio":
                if packet.dts is not None:
                    packet.stream = audio[packet.stream.index]
                    out.mux(packet)
                continue
            for frame in packet.decode():
                out.mux(video.encode(_stylised(model, frame, device)))
                frames += 1
        out.mux(video.encode(None))
    seconds = time.perf_counter() - started
    return {"frames": frames, "seconds": round(seconds, 1), "frames_per_s": round(frames / seconds, 1)}


def _stylised(model: torch.nn.Module, frame: av.VideoFrame, device: torch.device) -> av.VideoFrame:
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).to(device)
    with torch.inference_mode():
        y = model(rgb.permute(2, 0, 1)[None].float() / 255.0)
    picture = (y[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    styled = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
    styled.pts, styled.time_base = frame.pts, frame.time_base
    return styled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(restyle(args.source, args.target, torch.device(args.device))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
