"""The only module that knows about ranks: who we are, how work is handed out, how ranks agree on
setup results, how progress reaches the root, how data-parallel training splits a batch and
averages gradients, and how one failure stops the whole job.

Works the same under ``mpirun``/``srun`` and as a plain process (an MPI singleton of size 1).
"""
from __future__ import annotations

import copy as copy_module
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .devices import cpu_share, launcher_cpus
from .errors import InternalError, JobStopped, MpistyleError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

_TAG_PROGRESS = 11
_TAG_DONE = 12
_TAG_STOP = 13
_TAG_FROM_ROOT = 14
_TAG_WANT = 15  # a rank asks the root for its next item
_TAG_ITEM = 16  # the root's answer: an item, or None
_TAG_NOTE = 17  # a rank tells the root something as it goes (a segment staged, a video failed)
# How often a waiting rank checks for its message: short next to any stage, long for a CPU.
_POLL_S = 0.02


class Shift:
    """What one rank's work gets during the scoring phase: ``tick(n)`` reports ``n`` more
    frames done and is False once the job is stopping (the work should then give up),
    ``take()`` is the next item to do, or None once every item is handed out, and
    ``note(message)`` hands the root a message as the work goes (in the order they were sent).

    Items are handed out on demand, in order, to whichever rank asks next, so a faster rank
    does more of them and a slower one fewer; every item goes to exactly one rank. A rank's
    notes reach the root before its next request does.
    """

    def __init__(
        self, tick: Callable[[int], bool], take: Callable[[], Any | None], note: Callable[[Any], None]
    ) -> None:
        self.tick = tick
        self.take = take
        self.note = note


@dataclass
class RankContext:
    """Rank facts derived once; pass this object instead of asking MPI again elsewhere."""

    comm: Any
    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    # The CPUs this rank should run on: its share of the node's (devices.cpu_share).
    cpus: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def world(cls) -> RankContext:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        # Ranks sharing a node (and its GPUs), however the launcher numbered them.
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        found = node.allgather((frozenset(os.sched_getaffinity(0)), launcher_cpus()))
        cpus = cpu_share(node.rank, [own for own, _ in found], frozenset().union(*(launcher for _, launcher in found)))
        ctx = cls(comm, comm.rank, comm.size, node.rank, node.size, socket.gethostname(), cpus)
        node.Free()
        return ctx

    # -- agreeing on setup: every rank gets the same result or the same error ------------------

    def from_root(self, compute: Callable[[], T]) -> T:
        """Run ``compute`` on the root only and hand its result (or its error) to every rank.

        The other ranks wait by polling with short sleeps, not in a spinning MPI call, so a
        long root-only step (probing, encoding) keeps every CPU core for the root.
        """
        if self.is_root:
            outcome = attempt(compute)
            requests = [self.comm.isend(outcome, dest=rank, tag=_TAG_FROM_ROOT) for rank in range(1, self.size)]
            for request in requests:
                _wait(request)
        else:
            # Probe first: a plain irecv gets a fixed 32 KiB buffer, too small for a long index.
            while not self.comm.iprobe(source=0, tag=_TAG_FROM_ROOT):
                time.sleep(_POLL_S)
            outcome = self.comm.recv(source=0, tag=_TAG_FROM_ROOT)
            # A STOP the root sent while this rank was already done is stale now; drop it so a
            # later job in this process does not see it.
            while self.comm.iprobe(source=0, tag=_TAG_STOP):
                self.comm.recv(source=0, tag=_TAG_STOP)
        return unwrap(outcome)

    def check_all(self, compute: Callable[[], T]) -> T:
        """Run ``compute`` on every rank; if any rank fails, every rank raises the first error."""
        outcome = attempt(compute)
        errors = self.gather_all(None if outcome[0] else outcome[1])
        for rank, error in enumerate(errors):
            if error is not None:
                raise from_rank(error, rank) if rank != self.rank else error
        return outcome[1]

    def gather_all(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank (a plain process: ``[value]``)."""
        if self.size == 1:
            return [value]
        return list(self.comm.allgather(value))

    # -- data-parallel training: equal slices of one global batch, averaged gradients ------------

    def own_slice(self, batch: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous part of a global batch that every rank holds whole: rank ``r``
        of ``n`` gets the ``r``-th of ``n`` equal parts (so ``n`` ranks together train on
        exactly the batch one rank would)."""
        if len(batch) % self.size:
            raise ValueError(f"a batch of {len(batch)} does not split evenly over {self.size} ranks")
        per_rank = len(batch) // self.size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def mean_in_place(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace every tensor, on every rank, by its mean over the ranks, with one
        MPI_Allreduce of one flat float32 buffer: one message however many tensors.

        The buffer goes through host memory, which works with any MPI build, CUDA-aware or
        not. Tensors of other dtypes are averaged in float32 (gradients are float32 anyway).
        """
        if self.size == 1:
            return
        import torch
        from mpi4py import MPI

        flat = torch.cat([tensor.reshape(-1) for tensor in tensors]).to("cpu", torch.float32).contiguous()
        self.comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
        flat /= self.size
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    # -- the scoring phase: every rank works, progress flows to the root -----------------------

    def run_everywhere(
        self,
        work: Callable[[Shift], T],
        on_frames: Callable[[int], None],
        items: Iterator[Any] | None = None,
        on_note: Callable[[int, Any], None] | None = None,
    ) -> list[T]:
        """Every rank runs ``work(shift)`` (:class:`Shift`), taking the root's ``items`` one at
        a time as it goes (the iterator is read on the root alone, as items are asked for, so
        it may change course on what the notes said); progress reaches the root through
        ``on_frames``, and each rank's notes through ``on_note(rank, message)``.

        The root returns every rank's result in rank order, or raises the first real error
        once every rank has stopped (no rank is left waiting). Other ranks return ``[]``.
        """
        if not self.is_root:
            outcome = attempt(lambda: work(Shift(self._report, self._ask, self._note)))
            self.comm.send(outcome[1], dest=0, tag=_TAG_DONE)
            return []

        handed = items if items is not None else iter(())
        noted = on_note or _drop_note
        results: dict[int, Any] = {}
        stopped: set[int] = set()

        def failed() -> bool:
            return any(isinstance(r, MpistyleError) for r in results.values())

        def take() -> Any | None:
            # Nothing more once a rank failed: the asking rank finishes instead of starting anew.
            return None if failed() else next(handed, None)

        def stop_others() -> None:
            for rank in range(1, self.size):
                if rank not in results and rank not in stopped:
                    self.comm.send(None, dest=rank, tag=_TAG_STOP)
                    stopped.add(rank)

        def tick(frames: int) -> bool:
            on_frames(frames)
            self._take_messages(on_frames, noted, results, take)
            if failed():
                stop_others()
                return False
            return True

        outcome = attempt(lambda: work(Shift(tick, take, lambda message: noted(0, message))))
        results[0] = outcome[1]
        while len(results) < self.size:
            if failed():
                stop_others()
            if not self._take_messages(on_frames, noted, results, take):
                time.sleep(_POLL_S)
        errors = [(r, e) for r, e in sorted(results.items()) if isinstance(e, MpistyleError)]
        if errors:
            # A rank that only stopped because another failed is not the story; the failure is.
            rank, error = next(((r, e) for r, e in errors if not isinstance(e, JobStopped)), errors[0])
            raise from_rank(error, rank) if rank else error
        return [results[rank] for rank in range(self.size)]

    def _report(self, frames: int) -> bool:
        """Another rank's tick: progress to the root; False once the root said stop."""
        self.comm.send(frames, dest=0, tag=_TAG_PROGRESS)
        return not self.comm.iprobe(source=0, tag=_TAG_STOP)

    def _note(self, message: Any) -> None:
        """Another rank's note: to the root."""
        self.comm.send(message, dest=0, tag=_TAG_NOTE)

    def _ask(self) -> Any | None:
        """Another rank's take: ask the root, and wait for its answer (or for a stop)."""
        self.comm.send(None, dest=0, tag=_TAG_WANT)
        # The root answers every request, a stop or not: wait for the answer even after a STOP,
        # or it would be taken for the answer to this rank's first request of a later job (a
        # batch's next video) and that job's own answer lost.
        while not self.comm.iprobe(source=0, tag=_TAG_ITEM):
            time.sleep(_POLL_S)
        item = self.comm.recv(source=0, tag=_TAG_ITEM)
        if self.comm.iprobe(source=0, tag=_TAG_STOP):
            raise JobStopped("stopped because another rank failed")
        return item

    def _take_messages(
        self,
        on_frames: Callable[[int], None],
        on_note: Callable[[int, Any], None],
        results: dict[int, Any],
        take: Callable[[], Any | None],
    ) -> bool:
        """Root: handle every progress, note, request or result message that has arrived; False if none had."""
        from mpi4py import MPI

        status = MPI.Status()
        took = False
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            message = self.comm.recv(source=source, tag=tag)
            took = True
            if tag == _TAG_PROGRESS:
                on_frames(message)
            elif tag == _TAG_NOTE:
                on_note(source, message)
            elif tag == _TAG_WANT:
                self.comm.send(take(), dest=source, tag=_TAG_ITEM)
            elif tag == _TAG_DONE:
                results[source] = message
        return took

    # -- failure -----------------------------------------------------------------------------------

    def abort(self, code: int) -> None:
        """Stop every rank of the job at once (for crashes; errors go through the calls above)."""
        if self.size > 1:
            sys.stderr.flush()
            self.comm.Abort(code)


def from_rank(error: MpistyleError, rank: int) -> MpistyleError:
    """The same error, its message naming the rank it came from."""
    copy = copy_module.copy(error)
    copy.args = (f"rank {rank}: {error}",)
    return copy


def _drop_note(rank: int, message: Any) -> None:
    del rank, message


def _wait(request: Any) -> None:
    while not request.Test():
        time.sleep(_POLL_S)


def attempt(compute: Callable[[], T]) -> tuple[bool, Any]:
    try:
        return True, compute()
    except MpistyleError as err:
        return False, err
    except Exception as err:  # a bug: keep the traceback text, the object may not pickle
        return False, InternalError(f"internal error: {type(err).__name__}: {err}\n{traceback.format_exc()}")


def unwrap(outcome: tuple[bool, Any]) -> Any:
    ok, value = outcome
    if not ok:
        raise value
    return value

