"""How much a stylised video flickers: the warping error of Lai et al., "Learning Blind Video
Temporal Consistency" (ECCV 2018). No MPI, no files, no config.

For each pair of consecutive frames t, t+1 the optical flow of the *input* frames says where
every pixel of frame t went; the *stylised* frame t+1 is warped back onto frame t along it, and
the pair's error is the mean squared difference between stylised frame t and that warp over the
pixels the flow can be trusted on (the non-occluded mask M_t of Ruder et al.):

    E(t)   = sum_p M_t(p) * ||O_t(p) - warp(O_{t+1})(p)||^2 / (3 * sum_p M_t(p))
    E_warp = mean of E(t) over all pairs

Pixel scale, as in the authors' evaluation code: RGB intensities in [0, 1], the squared difference
averaged over the three channels (so 1e-3 is an RMS difference of about 8 grey levels of 255).
When every pixel of a pair is occluded the pair is averaged over all pixels, as theirs does.

The paper computes flow with FlowNet2 on a GPU; here it is OpenCV's DIS, from
:mod:`mpistyle.flow` (shared with the temporal blend). With its default ``fast`` preset the
metric's floor (the input clip scored against itself) is about 1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .flow import FlowCache, PairFlows, check_frames, warp


def pair_warping_error(styled_t: np.ndarray, styled_t1: np.ndarray, flows: PairFlows) -> tuple[float, float]:
    """(E(t), fraction of frame t masked as occluded) for one pair of stylised frames."""
    diff = styled_t.astype(np.float32) - warp(styled_t1, flows.forward)
    diff *= diff
    squared = diff[..., 0] + diff[..., 1] + diff[..., 2]  # not .sum(axis=2): far slower on a short axis
    mask = flows.forward_valid
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
        error, masked = pair_warping_error(styled_t, styled_t1, self.flows.for_pair(input_t, input_t1))
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
