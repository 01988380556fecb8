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


scattered_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.lists(st.integers(0, 300), max_size=40)),
        st.tuples(st.just("front"), st.integers(0, 50)),
        st.tuples(st.just("back"), st.integers(0, 50)),
        st.tuples(st.just("tail"), st.integers(0, 50)),
    ),
    max_size=80,
)


@given(scattered_ops)
def test_runs_of_any_frames_behave_as_a_python_deque(script: list[tuple[str, object]]) -> None:
    # frames in any order (runs of one, runs that continue the newest, repeats): the runs
    # are bookkeeping only
    d = PfnDeque()
    ref: deque[int] = deque()
    for op, arg in script:
        if op == "push":
            vals = np.array(arg, dtype=np.int64)
            d.push_back(vals)
            ref.extend(vals.tolist())
        elif op == "front":
            assert d.pop_front(arg).tolist() == [ref.popleft() for _ in range(min(arg, len(ref)))]  # type: ignore[arg-type]
        elif op == "back":
            m = min(arg, len(ref))  # type: ignore[call-overload]
            assert d.pop_back(arg).tolist() == [ref.pop() for _ in range(m)][::-1]  # type: ignore[arg-type]
        else:
            k = min(arg, len(ref))  # type: ignore[call-overload]
            assert d.tail(arg).tolist() == (list(ref)[len(ref) - k:] if k else [])  # type: ignore[arg-type]
        assert len(d) == len(ref) and d.to_array().tolist() == list(ref)
        assert d.sorted_array().tolist() == sorted(ref)  # repeats kept, as np.sort keeps them


def test_a_balloon_of_millions_of_frames_is_a_few_runs() -> None:
    d = PfnDeque()
    n = 8192 * 256
    for lo in range(0, n, 256):  # a virtio balloon filled 256 frames at a time
        d.push_back(np.arange(lo, lo + 256, dtype=np.int64))
    assert len(d) == n and d._n == 1  # one run
    d.pop_back(1000)
    d.push_back(np.array([5_000_000], dtype=np.int64))
    d.pop_front(10)
    assert d._n == 2 and d.tail(2).tolist() == [n - 1001, 5_000_000]


def test_newest_is_the_last_pushed() -> None:
    d = PfnDeque()
    d.push_back(np.array([7, 8, 9, 20], dtype=np.int64))
    assert d.newest() == 20
    d.pop_back(1)
    assert d.newest() == 9


@given(st.lists(st.tuples(st.integers(0, 600), st.integers(0, 40)), max_size=30),
       st.lists(st.integers(0, 60), max_size=30))
def test_push_run_is_push_back_of_its_frames(runs: list[tuple[int, int]], pops: list[int]
                                             ) -> None:
    a, b = PfnDeque(), PfnDeque()
    for (first, k), pop in zip(runs, pops + [0] * len(runs), strict=False):
        a.push_run(first, k)
        b.push_back(np.arange(first, first + k, dtype=np.int64))
        assert a.pop_front(pop).tolist() == b.pop_front(pop).tolist()
        assert a.runs()[0].tolist() == b.runs()[0].tolist()
        assert a.runs()[1].tolist() == b.runs()[1].tolist() and len(a) == len(b)


@given(scattered_ops, st.integers(0, 80))
def test_pop_front_runs_are_the_frames_pop_front_returns(script: list[tuple[str, object]],
                                                        k: int) -> None:
    a, b = PfnDeque(), PfnDeque()
    for op, arg in script:
        if op == "push":
            a.push_back(np.array(arg, dtype=np.int64))
            b.push_back(np.array(arg, dtype=np.int64))
    for _ in range(3):
        runs = a.pop_front_runs(k)
        assert [f for s, n in runs for f in range(s, s + n)] == b.pop_front(k).tolist()
        assert all(n > 0 for _, n in runs)
        assert len(a) == len(b) and a.to_array().tolist() == b.to_array().tolist()


@given(scattered_ops, st.lists(st.integers(0, 80), min_size=1, max_size=4))
def test_pop_back_runs_are_the_frames_pop_back_returns(script: list[tuple[str, object]],
                                                      ks: list[int]) -> None:
    a, b = PfnDeque(), PfnDeque()
    for op, arg in script:
        if op == "push":
            a.push_back(np.array(arg, dtype=np.int64))
            b.push_back(np.array(arg, dtype=np.int64))
    for k in ks:
        runs = a.pop_back_runs(k)
        assert [f for s, n in runs for f in range(s, s + n)] == b.pop_back(k).tolist()
        assert all(n > 0 for _, n in runs)
        assert len(a) == len(b) and a.to_array().tolist() == b.to_array().tolist()
        assert a.runs()[1].tolist() == b.runs()[1].tolist()
    a.push_run(5, 3)  # the deque goes on as usual after emptying
    b.push_back(np.arange(5, 8, dtype=np.int64))
    assert a.to_array().tolist() == b.to_array().tolist()
