"""The manager's subcommands: ``run``, ``status``, ``set``, ``journal``, ``top``.

Every client command takes ``--socket PATH``; without it, ``--config F``'s socket, else the
default (``$XDG_RUNTIME_DIR/memballoon/memballoon.sock``, ``/run/memballoon/memballoon.sock``
for root, else ``/tmp/memballoon-<uid>/memballoon.sock``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from memballoon.app.config import default_socket_path, load_config
from memballoon.app.control import request
from memballoon.cliargs import positive_int

MIB_F = float(1 << 20)


def _socket(a: argparse.Namespace) -> Path:
    if a.socket is not None:
        return Path(a.socket)
    if getattr(a, "config", None):
        return load_config(a.config).socket_path
    return default_socket_path()


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=132)  # piped: do not squeeze


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / MIB_F:.0f}"


def _cmd_run(a: argparse.Namespace) -> int:
    from memballoon.app.daemon import serve

    cfg = load_config(a.config)
    if a.socket is not None:
        cfg = cfg.model_copy(update={"socket": Path(a.socket)})
    return asyncio.run(serve(cfg))


#: Short names for the status table's pressure source column.
SOURCE_SHORT = {"qemu-guest-agent": "qga", "memballoon-agent": "agent",
                "balloon-stats": "stats", "agent": "agent", "none": "-"}


def status_table(st: dict[str, Any]) -> Any:
    from rich.table import Table

    mode = "enforced" if st.get("budget_enforced") else "watched"
    cg = st.get("cgroup")
    cgroup = "" if not cg else (f" · cgroup {_mib(cg.get('usage_bytes'))}/"
                                f"{_mib(cg.get('limit_bytes'))} MiB")
    t = Table(title=(f"memballoon · {st.get('world')} · policy {st.get('policy')} · host "
                     f"{_mib(st.get('host_resident_bytes'))}/{_mib(st.get('budget_bytes'))} "
                     f"MiB ({mode}){cgroup} · decisions {st.get('decisions')}"))
    for col in ("guest", "alive", "RAM", "size", "target", "actual", "free", "avail",
                "stall %", "refused", "min", "max", "source"):
        t.add_column(col, justify="left" if col in ("guest", "source") else "right")
    for g in st.get("guests", []):
        t.add_row(
            g["name"] + (" (manual)" if g.get("manual") else ""),
            "yes" if g["alive"] else "DEAD", _mib(g["ram_bytes"]), _mib(g["size_bytes"]),
            _mib(g["target_bytes"]), _mib(g["actual_bytes"]), _mib(g.get("free_bytes")),
            _mib(g.get("available_bytes")),
            "-" if g.get("stall_pct") is None else f"{g['stall_pct']:.1f}",
            "-" if g.get("refused_pages") is None else str(g["refused_pages"]),
            _mib(g.get("min_bytes")), _mib(g.get("max_bytes")),
            SOURCE_SHORT.get(g.get("pressure_source") or "none", str(g.get("pressure_source"))),
        )
    t.caption = ("sizes in MiB; target/actual are balloon sizes; source: where the guest's "
                 "pressure comes from (qga: QEMU guest agent, agent: memballoon agent, stats: "
                 "balloon stats)")
    notes = [f"{g['name']}: {g['note']}" for g in st.get("guests", []) if g.get("note")]
    if notes:
        t.caption += "\n" + "\n".join(notes)
    return t


def _cmd_status(a: argparse.Namespace) -> int:
    st = request(_socket(a), "status")
    if a.json:
        print(json.dumps(st))
        return 0
    _console().print(status_table(st))
    return 0


def _cmd_set(a: argparse.Namespace) -> int:
    res = request(_socket(a), "set", guest=a.guest, size=a.size, force=a.force)
    print(json.dumps(res) if a.json else
          (f"{a.guest}: back to the policy" if not res.get("manual") else
           f"{a.guest}: size {_mib(res['size_bytes'])} MiB, balloon "
           f"{_mib(res['balloon_bytes'])} MiB ({res['reason']}"
           f"{'' if res['applied'] else ', NOT applied'})"))
    return 0 if res.get("applied", True) else 1


def _cmd_journal(a: argparse.Namespace) -> int:
    recs = request(_socket(a), "journal", last=a.last, guest=a.guest)
    for r in recs:
        if a.json:
            print(json.dumps(r))
        elif "new_pages" in r:
            print(f"{r['time']} {r['guest']:<12} {r['kind']:<10} "
                  f"{_mib(r['old_bytes'])} -> {_mib(r['new_bytes'])} MiB balloon"
                  f"{'' if r.get('applied') else ' (not applied)'}: {r['reason']}")
        else:
            print(f"{r['time']} {r.get('guest') or '-':<12} {r['kind']:<10} {r.get('reason')}")
    return 0


def _cmd_top(a: argparse.Namespace) -> int:
    from rich.live import Live

    sock = _socket(a)
    if a.once:
        _console().print(status_table(request(sock, "status")))
        return 0
    with Live(status_table(request(sock, "status")), refresh_per_second=2) as live:
        while True:
            time.sleep(1.0)
            live.update(status_table(request(sock, "status")))


def register(sub: Any) -> None:
    """Add ``run``, ``status``, ``set``, ``journal`` and ``top`` to the CLI's subparsers."""

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--socket", help="control socket (default: the config's, or "
                       f"{default_socket_path()})")
        p.add_argument("--config", help="read the socket path from this config")
        return p

    p = sub.add_parser("run", help="run the host balloon manager daemon",
                       description="Run the manager: guests, policy, control socket, metrics.")
    p.add_argument("--config", required=True, help="host.toml (see examples/host.toml)")
    p.add_argument("--socket", help="override the config's control socket")
    p.set_defaults(func=_cmd_run)

    p = client("status", "show every guest's balloon, pressure and the host budget")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = client("set", "set a guest's size (its balloon is RAM - SIZE); SIZE 'auto' hands "
               "it back to the policy")
    p.add_argument("guest")
    p.add_argument("size", help="e.g. 384MiB, 1GiB, or auto (a unit is required)")
    p.add_argument("--force", action="store_true",
                   help="set a size under the guest's safety floor (its min, or its working "
                        "set plus 64 MiB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_set)

    p = client("journal", "show the decision journal")
    p.add_argument("--guest")
    p.add_argument("--last", type=positive_int, default=20)
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=_cmd_journal)

    p = client("top", "a live view of the guests (refreshes every second)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=_cmd_top)


__all__ = ["register", "status_table"]
