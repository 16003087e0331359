"""Where a rank runs: its share of the node's CPUs, and the precision ``auto`` picks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpistyle.devices import cpu_share, native_bf16, pick_precision


def shares(affinities: list[set[int]], launcher: set[int]) -> list[list[int]]:
    found = [frozenset(cpus) for cpus in affinities]
    return [sorted(cpu_share(rank, found, frozenset(launcher))) for rank in range(len(found))]


NODE = set(range(16))


def test_ranks_bound_apart_over_every_cpu_keep_their_cpus() -> None:
    # srun --cpus-per-task=4, or mpirun --map-by ppr:4:node:pe=4: the launcher already dealt them out.
    bound = [{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}]
    assert shares(bound, NODE) == [sorted(cpus) for cpus in bound]


def test_two_ranks_bound_to_a_core_each_get_half_the_node() -> None:
    # mpirun -n 2 binds each rank to one core: 14 of 16 would idle.
    assert shares([{0}, {1}], NODE) == [list(range(8)), list(range(8, 16))]


def test_unbound_ranks_share_the_node_without_overlap() -> None:
    assert shares([NODE] * 3, NODE) == [list(range(6)), list(range(6, 11)), list(range(11, 16))]


def test_ranks_bound_to_a_socket_each_are_dealt_its_cores() -> None:
    # mpirun -n 4 binds to sockets: two ranks on each 8-core socket would each run 8 threads.
    sockets = [set(range(8)), set(range(8)), set(range(8, 16)), set(range(8, 16))]
    assert shares(sockets, NODE) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_more_ranks_than_cpus_take_one_cpu_each_in_turn() -> None:
    assert shares([{0, 1}] * 3, {0, 1}) == [[0], [1], [0]]


def test_one_rank_alone_uses_every_cpu_it_was_given() -> None:
    assert shares([{3}], {2, 3, 5}) == [[2, 3, 5]]
    assert shares([{2, 3, 5}], {2, 3, 5}) == [[2, 3, 5]]


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_precision_is_bf16_exactly_where_this_cpu_has_native_bf16() -> None:
    cpu = torch.device("cpu")
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    assert native_bf16(cpu) is native
    assert pick_precision("auto", cpu) == ("bf16" if native else "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_precision_asked_for_is_the_one_used(precision: str) -> None:
    assert pick_precision(precision, torch.device("cpu")) == precision
