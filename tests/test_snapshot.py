"""Snapshot: frozen, versioned, strict; read back from disk as untrusted input."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import ValidationError

from memballoon.model.errors import ConfigError
from memballoon.model.snapshot import Snapshot


class Thing(Snapshot):
    version: Literal[1] = 1
    pages: int


def test_round_trip_and_frozen() -> None:
    t = Thing(pages=3)
    assert Thing.from_json(t.to_json()) == t
    with pytest.raises(ValidationError):
        t.pages = 4  # type: ignore[misc]


@pytest.mark.parametrize("text", ['{"pages": 1, "version": 2}', '{"pages": "x"}', '{}',
                                  '{"pages": 1, "more": 0}', "not json", b"\xff"])
def test_bad_snapshots_are_config_errors(text: str | bytes) -> None:
    with pytest.raises(ConfigError, match="Thing"):
        Thing.from_json(text)
