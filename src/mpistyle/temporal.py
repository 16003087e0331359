"""Less flicker: blend each stylised frame with the previous output frame, carried along the
input's optical flow. No MPI, no files, no config.

A per-frame style network answers small changes of its input with large changes of texture, so
the same wall shimmers from frame to frame. For frame t+1 the blender warps output frame t onto
t+1 with the input flow (t+1 -> t) and mixes

    out_{t+1} = (1 - alpha) * styled_{t+1} + alpha * warp(out_t)    where the flow holds,
    out_{t+1} = styled_{t+1}                                       where frame t+1 shows something
                                                                   frame t did not (occlusions)

a running average along motion paths: texture that the network redraws at random is averaged
over about (1 + alpha) / (1 - alpha) frames, texture it keeps is unchanged.

The chain starts again at ``reset()``, at the start of each chunk of frames (the pipeline's
GOPs), so an output frame depends only on the frames of its own chunk: any rank can restyle any
chunk, a resumed job gives the same frames, and the output does not depend on the rank count
(flows and blends are computed the same way whatever the threads, see tests/test_temporal.py).
"""
from __future__ import annotations

import cv2
import numpy as np

from .errors import ConfigError, InternalError
from .flicker import FlickerMeter
from .flow import FlowCache, check_frames, warp


class TemporalBlender:
    """``out = blender(input_frame, styled_frame)`` for the frames of a chunk, in order.

    ``flows`` may be shared with a FlickerMeter; it finds a pair's flows computed when it is
    called right after the blend of that pair (the cache keeps the last two pairs), as
    TemporalStage does.
    """

    def __init__(self, alpha: float, flows: FlowCache | None = None) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"temporal blend alpha must be in [0, 1) (0 turns it off), got {alpha}")
        self.alpha = float(alpha)
        self.flows = flows if flows is not None else FlowCache()
        self._prev_input: np.ndarray | None = None
        self._prev_output: np.ndarray | None = None

    def reset(self) -> None:
        """Start a new chain: the next frame is passed through unchanged."""
        self._prev_input = None
        self._prev_output = None

    def __call__(self, input_frame: np.ndarray, styled: np.ndarray) -> np.ndarray:
        check_frames(input_frame, styled)
        out = styled.astype(np.float32)
        if self._prev_input is not None and self._prev_output is not None and self.alpha > 0.0:
            flows = self.flows.for_pair(self._prev_input, input_frame)
            carried = warp(self._prev_output, flows.backward)
            blend = cv2.addWeighted(out, 1.0 - self.alpha, carried, self.alpha, 0.0)
            out = np.where(flows.backward_valid[..., None], blend, out)
        # Copies: callers refill their batch buffers, and the chain must keep what it saw.
        self._prev_input = input_frame.copy()
        # The chain carries the unrounded blend so rounding errors do not build up along it.
        self._prev_output = out
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class TemporalStage:
    """What a per-rank scoring loop calls on each batch of stylised frames: the temporal blend
    (``alpha`` > 0) and the flicker meters (``measure``), with one flow computation per frame
    pair shared by both. Batches come in frame order; ``reset`` goes at the start of each chunk.

    ``meter`` measures the frames returned (what gets written); ``meter_styled`` the model's own
    per-frame output, for comparison, when blending is on.
    """

    def __init__(self, alpha: float = 0.0, measure: bool = False, preset: str = "fast") -> None:
        self.flows = FlowCache(preset)
        self.blender = TemporalBlender(alpha, self.flows) if alpha > 0 else None
        self.meter = FlickerMeter(self.flows) if measure else None
        self.meter_styled = FlickerMeter(self.flows) if measure and self.blender is not None else None
        self._previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # input, styled, output

    def reset(self, contiguous: bool = False) -> None:
        """A new chunk starts: the blend chain restarts. ``contiguous``: the chunk's first frame
        directly follows the last frame given, so the meters still measure that pair (and with
        it the jump the restart causes); otherwise they skip it."""
        if self.blender is not None:
            self.blender.reset()
        if not contiguous:
            self._previous = None

    def __call__(self, inputs: np.ndarray, styled: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` uint8 input frames and their stylisations -> the frames to write."""
        if len(inputs) != len(styled):
            raise InternalError(f"{len(inputs)} input frames but {len(styled)} stylised frames")
        outputs = np.empty_like(styled)
        for index, (frame, own) in enumerate(zip(inputs, styled)):
            # Blend first: it computes the pair's flows, which the meters then find cached.
            outputs[index] = self.blender(frame, own) if self.blender is not None else own
            if self._previous is not None:
                before, before_styled, before_output = self._previous
                if self.meter is not None:
                    self.meter.update(before, frame, before_output, outputs[index])
                if self.meter_styled is not None:
                    self.meter_styled.update(before, frame, before_styled, own)
            if self.meter is not None:
                self._previous = (frame.copy(), own.copy(), outputs[index].copy())
        return outputs
