"""How much a stylised video flickers: the warping error of Lai et al., "Learning Blind Video
Temporal Consistency" (ECCV 2018), with the optical flow it needs. No MPI, no files, no config.

For each pair of consecutive frames t, t+1 the optical flow of the *input* frames says where
every pixel of frame t went; the *stylised* frame t+1 is warped back onto frame t along it, and
the pair's error is the mean squared difference between stylised frame t and that warp over the
pixels the flow can be trusted on (the non-occluded mask M_t of Ruder et al.):

    E(t)   = sum_p M_t(p) * ||O_t(p) - warp(O_{t+1})(p)||^2 / (3 * sum_p M_t(p))
    E_warp = mean of E(t) over all pairs

Pixel scale, as in the authors' evaluation code: RGB intensities in [0, 1], the squared difference
averaged over the three channels (so 1e-3 is an RMS difference of about 8 grey levels of 255).
When every pixel of a pair is occluded the pair is averaged over all pixels, as theirs does.

The paper computes flow with FlowNet2 on a GPU; here it is OpenCV's DIS (Kroeger et al. 2016),
the CPU flow fast enough to run beside the model. At 640x360 on one core (bench/flicker.py, on a
busy 2-core machine) one flow took 3 ms with the ``ultrafast`` preset, 5-7 ms ``fast``, 35 ms
``medium`` and 50-75 ms with Farneback; on a textured pan their mean end-point errors were 0.22,
0.13, 0.05 and 1.6 px (Farneback with the usual pyr 0.5, 3 levels, window 15). ``fast`` is the
default: the metric's floor (the input clip scored against itself) is about 1e-4, and a
frame pair (two flows for the occlusion check, two masks) costs about 20-30 ms, a tenth of the
model's time per frame on a CPU. Flows are computed on the grey-scale input frames.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from .errors import ConfigError, InternalError

FLOW_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def check_frames(*frames: np.ndarray) -> tuple[int, int]:
    """All frames must be uint8 (H, W, 3) RGB of one size; returns (H, W)."""
    shape = frames[0].shape
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != shape:
            raise InternalError(
                f"frames must be uint8 RGB arrays of one shape (H, W, 3); got {frame.dtype} {frame.shape} beside {shape}"
            )
    return shape[0], shape[1]


def to_gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


class FlowEstimator:
    """Dense optical flow between two grey frames with OpenCV's DIS.

    ``flow = estimator(a, b)`` is (H, W, 2) float32 defined on frame ``a``: pixel (x, y) of ``a``
    shows the same point as (x + flow[y, x, 0], y + flow[y, x, 1]) of ``b``.
    """

    def __init__(self, preset: str = "fast") -> None:
        if preset not in FLOW_PRESETS:
            raise ConfigError(f"unknown optical flow preset '{preset}': choose one of {', '.join(FLOW_PRESETS)}")
        self.preset = preset

    def __call__(self, gray_from: np.ndarray, gray_to: np.ndarray) -> np.ndarray:
        # A new DIS object per pair (creating one costs ~10 us): a reused one keeps state
        # between calls, so a pair's flow would depend on the pairs before it, and the output
        # on where a rank's share began. No initial flow is passed either.
        return cv2.DISOpticalFlow_create(FLOW_PRESETS[self.preset]).calc(gray_from, gray_to, None)  # type: ignore[attr-defined]


# Pixel coordinates per frame size, built once: a video has one size, so this stays tiny.
_grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    key = (height, width)
    if key not in _grids:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        _grids[key] = (xs, ys)
    return _grids[key]


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out[y, x] = image[y + flow_y, x + flow_x]``, bilinear, as float32.

    With ``flow`` from frame a to frame b and ``image`` = frame b, the result is b aligned on a.
    Points that fall outside take the nearest edge pixel; callers mask them (see non_occluded).
    """
    xs, ys = _grid(*flow.shape[:2])
    return cv2.remap(
        image.astype(np.float32, copy=False), xs + flow[..., 0], ys + flow[..., 1],
        interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )


def _norm2(flow: np.ndarray) -> np.ndarray:
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
    occluded = _norm2(flow_ab + back) > 0.01 * (_norm2(flow_ab) + _norm2(back)) + 0.5
    if motion_boundaries:
        # Forward differences, zero on the last row and column.
        grad = np.zeros((height, width), np.float32)
        grad[:, :-1] += _norm2(flow_ab[:, :-1] - flow_ab[:, 1:])
        grad[:-1, :] += _norm2(flow_ab[:-1, :] - flow_ab[1:, :])
        occluded |= grad > 0.01 * _norm2(flow_ab) + 0.002
    xs, ys = _grid(height, width)
    tx, ty = xs + flow_ab[..., 0], ys + flow_ab[..., 1]
    occluded |= (tx < 0) | (tx > width - 1) | (ty < 0) | (ty > height - 1)
    return ~occluded


@dataclass(frozen=True)
class PairFlow:
    """Both flows of one pair of input frames t, t+1, and the masks derived from them."""

    forward: np.ndarray  # on frame t, pointing into t+1
    backward: np.ndarray  # on frame t+1, pointing into t
    motion_boundaries: bool = True

    @cached_property
    def valid_first(self) -> np.ndarray:
        """Pixels of frame t visible in frame t+1 (the warping error's mask M_t)."""
        return non_occluded(self.forward, self.backward, self.motion_boundaries)

    @cached_property
    def valid_second(self) -> np.ndarray:
        """Pixels of frame t+1 visible in frame t (where the temporal blend may reuse frame t)."""
        return non_occluded(self.backward, self.forward, self.motion_boundaries)


class FlowCache:
    """Flows of the last few input pairs, so the flicker meter and the temporal blender pay for
    one flow computation per pair when both run. Pairs are recognised by the contents of their
    grey frames (an exact compare, a few microseconds), so callers may reuse their buffers."""

    def __init__(self, preset: str = "fast", motion_boundaries: bool = True, size: int = 2) -> None:
        self.estimator = FlowEstimator(preset)
        self.motion_boundaries = motion_boundaries
        self.size = size
        self.computed = 0  # pairs whose flows were computed (not found in the cache)
        self._entries: OrderedDict[int, tuple[np.ndarray, np.ndarray, PairFlow]] = OrderedDict()
        self._next_key = 0

    def pair(self, input_t: np.ndarray, input_t1: np.ndarray) -> PairFlow:
        check_frames(input_t, input_t1)
        gray_t, gray_t1 = to_gray(input_t), to_gray(input_t1)
        for key, (cached_t, cached_t1, flows) in self._entries.items():
            if np.array_equal(cached_t, gray_t) and np.array_equal(cached_t1, gray_t1):
                self._entries.move_to_end(key)
                return flows
        flows = PairFlow(self.estimator(gray_t, gray_t1), self.estimator(gray_t1, gray_t), self.motion_boundaries)
        self.computed += 1
        self._entries[self._next_key] = (gray_t, gray_t1, flows)
        self._next_key += 1
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return flows


def pair_error(styled_t: np.ndarray, styled_t1: np.ndarray, flows: PairFlow) -> tuple[float, float]:
    """(E(t), fraction of frame t masked as occluded) for one pair of stylised frames."""
    diff = styled_t.astype(np.float32) - warp(styled_t1, flows.forward)
    diff *= diff
    squared = diff[..., 0] + diff[..., 1] + diff[..., 2]  # not .sum(axis=2): far slower on a short axis
    mask = flows.valid_first
    valid = int(np.count_nonzero(mask))
    total = float(squared.sum(where=mask, dtype=np.float64)) if valid else float(squared.sum(dtype=np.float64))
    # Back to [0, 1] intensities and the mean over the three channels.
    error = total / (3 * 255.0**2 * (valid or mask.size))
    return error, 1.0 - valid / mask.size


@dataclass
class FlickerState:
    """What a FlickerMeter has accumulated: plain numbers, so ranks can send and sum them."""

    error_sum: float = 0.0  # sum of E(t) over the pairs seen
    pairs: int = 0
    masked_sum: float = 0.0  # sum over pairs of the fraction of pixels masked as occluded

    def __add__(self, other: FlickerState) -> FlickerState:
        return FlickerState(self.error_sum + other.error_sum, self.pairs + other.pairs, self.masked_sum + other.masked_sum)


class FlickerMeter:
    """Accumulates the warping error over frame pairs; ``value()`` is E_warp over all of them.

    Per-rank meters combine with ``merge`` (or by adding their ``state()``), because E_warp is a
    plain mean over pairs: every pair weighs the same, whichever rank measured it.
    """

    def __init__(self, flows: FlowCache | None = None, state: FlickerState | None = None) -> None:
        self.flows = flows if flows is not None else FlowCache()
        self._state = FlickerState() if state is None else FlickerState(state.error_sum, state.pairs, state.masked_sum)

    def update(self, input_t: np.ndarray, input_t1: np.ndarray, styled_t: np.ndarray, styled_t1: np.ndarray) -> float:
        """Adds the pair (t, t+1) and returns its E(t)."""
        check_frames(input_t, input_t1, styled_t, styled_t1)
        error, masked = pair_error(styled_t, styled_t1, self.flows.pair(input_t, input_t1))
        self._state = self._state + FlickerState(error, 1, masked)
        return error

    def value(self) -> float | None:
        """E_warp, in [0, 1] pixel units squared; None before the first pair."""
        return self._state.error_sum / self._state.pairs if self._state.pairs else None

    def masked_fraction(self) -> float | None:
        """Mean fraction of pixels left out as occluded: a flow-quality check (a few % on a pan)."""
        return self._state.masked_sum / self._state.pairs if self._state.pairs else None

    def state(self) -> FlickerState:
        return FlickerState(self._state.error_sum, self._state.pairs, self._state.masked_sum)

    def merge(self, other: FlickerMeter | FlickerState) -> None:
        self._state = self._state + (other.state() if isinstance(other, FlickerMeter) else other)

    def __repr__(self) -> str:
        value = self.value()
        shown = "n/a" if value is None else f"{value:.6f}"
        return f"FlickerMeter(E_warp={shown}, pairs={self._state.pairs})"
