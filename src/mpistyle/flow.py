"""Dense optical flow between input frames, and what the temporal blend (temporal.py) and the
flicker meter (flicker.py) derive from it: the backward warp and the mask of the pixels where
the flow can be trusted. No MPI, no files, no config.

The flow is OpenCV's DIS (Kroeger et al. 2016), the CPU flow fast enough to run beside the
model. At 640x360 on one core (bench/flicker.py, on a busy 2-core machine) one flow took 3 ms
with the ``ultrafast`` preset, 5-7 ms ``fast``, 35 ms ``medium`` and 50-75 ms with Farneback; on
a textured pan their mean end-point errors were 0.22, 0.13, 0.05 and 1.6 px (Farneback with the
usual pyr 0.5, 3 levels, window 15). ``fast`` is the default: a frame pair (two flows for the
occlusion check, two masks) costs about 20-30 ms, a tenth of the model's time per frame on a
CPU. Flows are computed on the grey-scale input frames.

OpenCV is imported inside the functions that call it, not here: config.py imports this module
for :data:`FLOW_PRESETS`, and a job without temporal features should not load OpenCV.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import ConfigError, InternalError

# OpenCV's DIS presets, fastest first: each name is the suffix of cv2.DISOPTICAL_FLOW_PRESET_<NAME>.
FLOW_PRESETS = ("ultrafast", "fast", "medium")


def check_frames(*frames: np.ndarray) -> None:
    """All frames must be uint8 (H, W, 3) RGB of one size."""
    shape = frames[0].shape
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != shape:
            raise InternalError(
                f"frames must be uint8 RGB arrays of one shape (H, W, 3); got {frame.dtype} {frame.shape} beside {shape}"
            )


def to_gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


class FlowEstimator:
    """Dense optical flow between two grey frames with OpenCV's DIS.

    ``flow = estimator(a, b)`` is (H, W, 2) float32 defined on frame ``a``: pixel (x, y) of ``a``
    shows the same point as (x + flow[y, x, 0], y + flow[y, x, 1]) of ``b``.
    """

    def __init__(self, preset: str = "fast") -> None:
        if preset not in FLOW_PRESETS:
            raise ConfigError(f"unknown optical flow preset '{preset}': choose one of {', '.join(FLOW_PRESETS)}")
        import cv2

        self.preset = preset
        self._dis_preset: int = getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}")

    def __call__(self, gray_from: np.ndarray, gray_to: np.ndarray) -> np.ndarray:
        import cv2

        # A new DIS object per pair (creating one costs ~10 us): a reused one keeps state
        # between calls, so a pair's flow would depend on the pairs before it, and the output
        # on where a rank's segments began. No initial flow is passed either.
        return cv2.DISOpticalFlow_create(self._dis_preset).calc(gray_from, gray_to, None)  # type: ignore[attr-defined]


# Pixel coordinates per frame size, built once: a video has one size, so this stays tiny.
_pixel_grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys): each pixel's own x and y coordinate, float32 (H, W)."""
    key = (height, width)
    if key not in _pixel_grids:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        _pixel_grids[key] = (xs, ys)
    return _pixel_grids[key]


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out[y, x] = image[y + flow_y, x + flow_x]``, bilinear, as float32.

    With ``flow`` from frame a to frame b and ``image`` = frame b, the result is b aligned on a.
    Points that fall outside take the nearest edge pixel; callers mask them (see non_occluded).
    """
    import cv2

    xs, ys = _pixel_grid(*flow.shape[:2])
    return cv2.remap(
        image.astype(np.float32, copy=False), xs + flow[..., 0], ys + flow[..., 1],
        interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )


def _squared_norm(flow: np.ndarray) -> np.ndarray:
    """|w|^2 per pixel. Spelt out: numpy's sum over a last axis of length 2 is ten times slower."""
    u, v = flow[..., 0], flow[..., 1]
    return u * u + v * v


def non_occluded(flow_ab: np.ndarray, flow_ba: np.ndarray, motion_boundaries: bool = True) -> np.ndarray:
    """Boolean (H, W) mask on frame a of the pixels whose flow can be trusted (Ruder et al. 2016).

    A pixel is occluded when the forward and the warped backward flow disagree,
    ``|w + w'|^2 > 0.01 (|w|^2 + |w'|^2) + 0.5`` with ``w' = flow_ba`` sampled where ``w`` points;
    on a motion boundary, ``|grad u|^2 + |grad v|^2 > 0.01 |w|^2 + 0.002`` (both as the paper and
    Lai et al.'s evaluation code have them); or when it leaves the frame, since frame b has
    no such pixel (the paper leaves the border open; treating it as occluded keeps edge
    replication out of the error).
    """
    height, width = flow_ab.shape[:2]
    back = warp(flow_ba, flow_ab)
    occluded = _squared_norm(flow_ab + back) > 0.01 * (_squared_norm(flow_ab) + _squared_norm(back)) + 0.5
    if motion_boundaries:
        # Forward differences, zero on the last row and column.
        grad = np.zeros((height, width), np.float32)
        grad[:, :-1] += _squared_norm(flow_ab[:, :-1] - flow_ab[:, 1:])
        grad[:-1, :] += _squared_norm(flow_ab[:-1, :] - flow_ab[1:, :])
        occluded |= grad > 0.01 * _squared_norm(flow_ab) + 0.002
    xs, ys = _pixel_grid(height, width)
    tx, ty = xs + flow_ab[..., 0], ys + flow_ab[..., 1]
    occluded |= (tx < 0) | (tx > width - 1) | (ty < 0) | (ty > height - 1)
    return ~occluded


@dataclass(frozen=True)
class PairFlows:
    """Both flows of one pair of input frames t, t+1, and the masks of where each holds."""

    forward: np.ndarray  # on frame t, pointing into t+1
    backward: np.ndarray  # on frame t+1, pointing into t
    motion_boundaries: bool = True

    @cached_property
    def forward_valid(self) -> np.ndarray:
        """Pixels of frame t visible in frame t+1 (the warping error's mask M_t)."""
        return non_occluded(self.forward, self.backward, self.motion_boundaries)

    @cached_property
    def backward_valid(self) -> np.ndarray:
        """Pixels of frame t+1 visible in frame t (where the temporal blend may reuse frame t)."""
        return non_occluded(self.backward, self.forward, self.motion_boundaries)


class FlowCache:
    """Flows of the last few input pairs, so the flicker meter and the temporal blender pay for
    one flow computation per pair when both run. Pairs are recognised by the contents of their
    grey frames (an exact compare, a few microseconds), so callers may reuse their buffers."""

    def __init__(self, preset: str = "fast", motion_boundaries: bool = True, capacity: int = 2) -> None:
        self.estimator = FlowEstimator(preset)
        self.motion_boundaries = motion_boundaries
        self.capacity = capacity
        self.pairs_computed = 0  # pairs whose flows were computed (not found in the cache)
        self._entries: list[tuple[np.ndarray, np.ndarray, PairFlows]] = []  # least recently used first

    def for_pair(self, input_t: np.ndarray, input_t1: np.ndarray) -> PairFlows:
        """The flows between two RGB input frames, computed or found in the cache."""
        check_frames(input_t, input_t1)
        gray_t, gray_t1 = to_gray(input_t), to_gray(input_t1)
        for index, (cached_t, cached_t1, flows) in enumerate(self._entries):
            if np.array_equal(cached_t, gray_t) and np.array_equal(cached_t1, gray_t1):
                self._entries.append(self._entries.pop(index))
                return flows
        flows = PairFlows(self.estimator(gray_t, gray_t1), self.estimator(gray_t1, gray_t), self.motion_boundaries)
        self.pairs_computed += 1
        self._entries.append((gray_t, gray_t1, flows))
        while len(self._entries) > self.capacity:
            del self._entries[0]
        return flows
