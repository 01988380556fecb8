"""state_of/state_diff: two objects compare equal exactly when everything they hold does."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memballoon.guest.pfndeque import PfnDeque
from memballoon.guest.vmw_driver import PfnStack
from memballoon.guest.workload import Idle
from memballoon.harness.pair import make_pair
from memballoon.harness.state import state_diff, state_of
from memballoon.model.units import PageState, mib_to_pages


@dataclass
class Box:
    a: int
    arr: np.ndarray
    items: list[object] = field(default_factory=list)


class Slotted:
    __slots__ = ("x", "y")

    def __init__(self, x: object, y: object) -> None:
        self.x, self.y = x, y


def test_equal_objects_have_equal_states_and_any_difference_shows() -> None:
    one = Box(1, np.arange(4), [Slotted(PageState.FREE, {"k": 2.5})])
    two = Box(1, np.arange(4), [Slotted(PageState.FREE, {"k": 2.5})])
    assert state_of(one) == state_of(two)
    two.items[0].y["k"] = 3.0  # type: ignore[attr-defined]
    two.arr[2] = 7
    diff = state_diff(state_of(one), state_of(two))
    assert any("arr" in d for d in diff) and any("items[0].y" in d for d in diff)
    three = Box(1, np.arange(4), [Slotted(PageState.ANON, {"k": 2.5})])
    assert state_of(one) != state_of(three)  # an enum member is its value and its type


def test_growable_pfn_lists_compare_by_contents_not_spare_capacity() -> None:
    s1, s2 = PfnStack(16), PfnStack(4096)
    d1, d2 = PfnDeque(), PfnDeque()
    for s, d in ((s1, d1), (s2, d2)):
        s.extend(np.arange(10, 20))
        d.push_back(np.arange(5))
    s2.push(99)
    s2.pop(1)
    assert state_of((s1, d1)) == state_of((s2, d2))
    s2.push(5)
    assert state_of(s1) != state_of(s2)


def test_aliasing_is_part_of_the_state() -> None:
    shared = [1]
    assert state_of([shared, shared]) != state_of([[1], [1]])


def test_two_pairs_built_alike_are_alike_until_one_moves() -> None:
    a = make_pair("virtio", mib_to_pages(64), Idle(anon_mib=4, file_mib=2))
    b = make_pair("virtio", mib_to_pages(64), Idle(anon_mib=4, file_mib=2))
    assert state_diff(state_of(a), state_of(b)) == []
    b.set_target(100)
    assert state_diff(state_of(a), state_of(b)) != []

