"""The unit of work: one segment of a video.

A segment is frames ``[start, stop)`` of the input, in presentation order, that one rank
decodes (from the keyframe at ``seek_pts``), scores, encodes on its own (it opens with a
keyframe) and stages as one file; the root joins the staged segments in ``number`` order. The
plan makes every segment once, from the input alone, and the same object travels to the rank
that does it and, with what doing it met, back to the join.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    number: int  # its place in the output, from 0
    start: int  # first frame (presentation order)
    stop: int  # one past its last frame
    # The pts of the keyframe decoding starts from (at or before frame ``start``); None: the
    # start of the stream. Frames decoded before ``start`` are dropped.
    seek_pts: int | None

    @property
    def frames(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"segment {self.number} (frames {self.start}-{self.stop - 1})"


def largest_first(segments: Sequence[Segment]) -> list[Segment]:
    """The order to hand segments out in: the longest first (in number order among equals), so
    the last ones handed out are short and the ranks finish close together."""
    return sorted(segments, key=lambda segment: (-segment.frames, segment.number))
