import argparse

import pytest

from memballoon.cliargs import nonneg_int, positive_float, positive_int


def test_good_values_pass() -> None:
    assert positive_int("3") == 3 and nonneg_int("0") == 0 and positive_float("0.5") == 0.5


@pytest.mark.parametrize("fn, text, needle", [
    (positive_int, "0", "must be positive"), (positive_int, "x", "not a whole number"),
    (nonneg_int, "-1", "must be >= 0"), (positive_float, "-2", "must be positive"),
    (positive_float, "lots", "not a number"),
])
def test_bad_values_name_what_is_wrong(fn, text: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        fn(text)
