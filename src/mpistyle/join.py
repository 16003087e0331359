"""The root's join: the staged segments, in order, by stream copy (no decode, no encode), with
the input's audio, into the output file, which appears under its name only when complete."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from . import signals
from .errors import InternalError, OutputError
from .files import replacing
from .mux import Muxer, stream_dts
from .plan import Plan
from .report import SegmentDone


def join(plan: Plan, finished: Sequence[SegmentDone], ready: Callable[[Path], None] | None = None) -> None:
    """Write ``plan.output`` from the staged segments that ``finished`` (every rank's notes)
    reports; ``ready`` is called with the complete file just before it is renamed into place
    (:func:`files.replacing`)."""
    done = {f.number for f in finished}
    missing = [s for s in plan.segments if s.number not in done]
    if missing:
        raise InternalError(f"no rank reports {missing[0]} done ({len(missing)} segment(s) missing)")
    info = plan.info
    # The segments' pts are the input's, each frame's once: sorted, they are the whole stream's.
    dts = stream_dts(sorted(info.frame_pts), max((f.reorder_depth for f in finished), default=0))
    try:
        with replacing(plan.output, ready=ready) as partial:
            with Muxer(partial, info, plan.settings, dts, plan.container_format, plan.audio) as muxer:
                for segment in plan.segments:
                    staged = plan.staging.read(segment)
                    muxer.add(staged.packets, staged.extradata)
                    signals.check()
                muxer.finish()
    except OSError as err:
        raise OutputError(f"cannot write {plan.output}: {err.strerror or err}") from None
