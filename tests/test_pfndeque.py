from collections import deque

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from memballoon.guest.pfndeque import PfnDeque

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 700)),
        st.tuples(st.just("front"), st.integers(0, 700)),
        st.tuples(st.just("back"), st.integers(0, 700)),
    ),
    max_size=60,
)


@given(ops)
def test_matches_a_python_deque(script: list[tuple[str, int]]) -> None:
    d = PfnDeque()
    ref: deque[int] = deque()
    nxt = 0
    for op, k in script:
        if op == "push":
            vals = np.arange(nxt, nxt + k, dtype=np.int64)
            nxt += k
            d.push_back(vals)
            ref.extend(vals.tolist())
        elif op == "front":
            got = d.pop_front(k).tolist()
            want = [ref.popleft() for _ in range(min(k, len(ref)))]
            assert got == want
        else:
            got = d.pop_back(k).tolist()
            m = min(k, len(ref))
            want = [ref.pop() for _ in range(m)][::-1]
            assert got == want
        assert len(d) == len(ref)
        assert d.to_array().tolist() == list(ref)


def test_empty_pops_return_empty_arrays() -> None:
    d = PfnDeque()
    assert d.pop_front(5).size == 0
    assert d.pop_back(5).size == 0


def test_tail_peeks_at_the_newest() -> None:
    d = PfnDeque()
    d.push_back(np.arange(10, dtype=np.int64))
    d.pop_front(3)
    assert d.tail(4).tolist() == [6, 7, 8, 9]
    assert d.tail(100).tolist() == list(range(3, 10))
    assert len(d) == 7
