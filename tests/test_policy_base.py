"""``policy.base``: ``clamp_balloon``, written out for speed, is the definition it replaced."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from memballoon.policy.base import clamp_balloon
from memballoon.policy.sample import GuestSample, GuestSettings

PAGES = st.integers(0, 1 << 22)


@given(ram=PAGES, lo=PAGES, span=st.none() | PAGES, balloon=st.integers(-(1 << 23), 1 << 23))
def test_clamp_balloon_keeps_the_guest_between_its_floor_and_ceiling(
        ram: int, lo: int, span: int | None, balloon: int) -> None:
    settings = GuestSettings(min_pages=lo, max_pages=None if span is None else lo + span)
    g = GuestSample("g", ram, 0, 0, settings)
    want = max(g.ram_pages - g.ceiling_pages(), min(g.ram_pages - g.floor_pages(), balloon))
    assert clamp_balloon(g, balloon) == want
    assert g.floor_pages() <= ram - clamp_balloon(g, balloon) <= g.ceiling_pages()
