import json

import pytest

from memballoon.cli import main


def test_bench_protocol_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "protocol", "--protocol", "vmw-batched", "--guest-mib", "256",
                 "--balloon-mib", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("protocol", "guest_pages", "target_pages", "balloon_pages", "cycles",
                "simulated_seconds", "wall_seconds", "pages_per_wall_second",
                "invariant_violations", "driver_stats"):
        assert key in doc
    assert doc["balloon_pages"] == 16384 and doc["invariant_violations"] == 0


def test_bench_protocol_is_one_pair_and_points_to_the_simulator(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "protocol", "--protocol", "virtio"]) == 2
    assert "many guests: memballoon bench sim" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "protocol", "--guest-mib", "0", "--balloon-mib", "1"], "must be positive"),
    (["bench", "protocol", "--guest-mib", "lots", "--balloon-mib", "1"], "not a whole number"),
    (["bench", "protocol", "--protocol", "xen"], "invalid choice"),
    (["demo", "--seconds", "-3"], "must be positive"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv: list[str], needle: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_errors_from_the_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "protocol", "--guest-mib", "256", "--balloon-mib", "300"]) == 2
    assert "balloon-mib" in capsys.readouterr().err
    assert main(["bench", "protocol"]) == 2
    assert "--guest-mib" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["bench", "reclaim", "--ram", "1g"],
    ["demo", "--ram", "64k"],
])
def test_ram_kinds_are_checked(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ram" in err and "invalid choice" in err
