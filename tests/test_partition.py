from __future__ import annotations

import pytest

from mpistyle.parallel import partition


@pytest.mark.parametrize(
    "sizes, parts",
    [([6] * 5, 1), ([6] * 5, 2), ([6] * 5, 3), ([6] * 8, 3), ([12, 1, 1, 30, 5], 4), ([6, 6], 5), ([1], 3), ([], 2)],
)
def test_every_unit_in_exactly_one_contiguous_part(sizes: list[int], parts: int) -> None:
    ranges = partition(sizes, parts)
    assert len(ranges) == parts
    assert [u for r in ranges for u in r] == list(range(len(sizes)))
    assert all(r.step == 1 for r in ranges)
    assert sum(sum(sizes[u] for u in r) for r in ranges) == sum(sizes)


def test_shares_balanced_to_the_unit() -> None:
    ranges = partition([6] * 8, 4)  # 48 frames -> 12 each
    assert [sum(6 for _ in r) for r in ranges] == [12, 12, 12, 12]
    ranges = partition([6] * 5, 3)  # 30 frames: 10 each is impossible, 12/6/12 is the nearest cut
    assert [6 * len(r) for r in ranges] == [12, 6, 12]


def test_frames_not_divisible_by_ranks_are_all_kept() -> None:
    # The reference pipeline dropped the remainder; 7 GOPs of 1 frame over 3 ranks keeps all 7.
    ranges = partition([1] * 7, 3)
    assert sorted(len(r) for r in ranges) == [2, 2, 3]


def test_more_ranks_than_units_leaves_some_idle() -> None:
    ranges = partition([10, 10], 4)
    assert sum(1 for r in ranges if len(r)) == 2


def test_parts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        partition([1], 0)
