"""For operators: the systemd unit and /etc example hold together, and `pip install .` outside
the repository gives a working `memballoon`."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memballoon.app.config import load_config
from memballoon.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_the_unit_runs_the_daemon_on_the_etc_config_and_is_hardened() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "packaging" / "memballoon.service")
    svc = unit["Service"]
    argv = svc["ExecStart"].split()
    assert argv[0].endswith("/memballoon") and argv[1:] == ["run", "--config",
                                                             "/etc/memballoon/host.toml"]
    args = build_parser().parse_args(argv[1:])
    assert args.func is not None  # the command exists with these arguments
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules",
                "RestrictSUIDSGID"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict"
    # what it writes is inside what the unit lets it write
    cfg = load_config(ROOT / "packaging" / "host.toml")
    writable = svc["ReadWritePaths"].split()
    for path in (cfg.journal, cfg.socket):
        assert path is not None and any(str(path).startswith(w) for w in writable), path
    assert cfg.world == "libvirt" and cfg.budget == "auto"


@pytest.mark.slow
def test_pip_install_outside_the_repository_gives_a_working_command(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(ROOT)], check=True, timeout=600)
    assert (target / "memballoon" / "py.typed").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [sys.executable, "-m", "memballoon"]
    out = subprocess.run([*run, "--version"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.startswith("memballoon ")
    bench = subprocess.run([*run, "bench", "protocol", "--protocol", "vmw-batched",
                            "--guest-mib", "256", "--balloon-mib", "64", "--json"],
                           cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert bench.returncode == 0, bench.stderr
    assert '"invariant_violations": 0' in bench.stdout
    loaded = subprocess.run([*run, "-h"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert "demo" in loaded.stdout
    imported = subprocess.run([sys.executable, "-c", "import memballoon; print(memballoon."
                               "__file__)"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=True, timeout=60)
    assert imported.stdout.startswith(str(target))  # not the repository's source
