"""The ``memballoon`` command.

Every subcommand validates its arguments up front and answers a wrong one with a one-line
error naming the argument (exit status 2); results go to stdout (JSON with ``--json``),
progress to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from memballoon import __version__
from memballoon.cliargs import nonneg_int, positive_float, positive_int
from memballoon.model.errors import MemballoonError


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=False))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {json.dumps(v) if isinstance(v, dict | list) else v}")


def _progress(msg: str) -> None:
    print(f"memballoon: {msg}", file=sys.stderr, flush=True)


def _cmd_bench_protocol(args: argparse.Namespace) -> int:
    from memballoon.bench.protocol import run_single

    if args.guest_mib is None or args.balloon_mib is None:
        raise MemballoonError("bench protocol: give --guest-mib and --balloon-mib "
                              "(many guests: memballoon bench sim)")
    result = run_single(args.protocol, args.guest_mib, args.balloon_mib,
                        workload=args.workload, max_cycles=args.max_cycles)
    _emit(result, args.json)
    return 0 if result["invariant_violations"] == 0 else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from memballoon.app.demo import DemoConfig, print_summary, run_demo

    cfg = DemoConfig(seconds=args.seconds, guest_mib=args.guest_mib, budget_mib=args.budget_mib,
                     seed=args.seed, ram=args.ram, setup_hugepages=args.setup_hugepages)
    live = sys.stdout.isatty() and not args.json
    summary = asyncio.run(run_demo(cfg, live=live, journal_path=args.journal))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    ok = summary["guest_oom_kills"] == 0 and summary["data_corruptions"] == 0
    return 0 if ok else 1


def _cmd_bench_reclaim(args: argparse.Namespace) -> int:
    from memballoon.bench.reclaim import run_reclaim

    result = run_reclaim(args.protocol, args.guest_mib, repeat=args.repeat, ram=args.ram,
                         setup_hugepages=args.setup_hugepages, array_pfns=args.array_pfns)
    _emit(result, args.json)
    return 0 if result["lost_pages"] == 0 else 1


def _add_ram_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", choices=["4k", "thp", "hugetlb"], default="4k",
                   help="what backs guest RAM: 4 KiB shmem, shmem in transparent huge pages, "
                        "or hugetlbfs 2 MiB pages (default 4k)")
    p.add_argument("--setup-hugepages", action="store_true",
                   help="as root, turn shmem THP on or grow the hugetlb pool for this run if "
                        "--ram needs it, and put the values back afterwards")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memballoon",
        description="Memory ballooning for virtual machines: move memory between guests.",
    )
    p.add_argument("--version", action="version", version=f"memballoon {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="three local guests with real memory share a host budget (the main job)",
        description="Start 3 local guests (idle, steady, bursty) of real memfd RAM on a host "
                    "budget smaller than their sum; the manager with the default policy moves "
                    "memory between them with their balloons; then print a summary.",
    )
    demo.add_argument("--seconds", type=positive_float, default=30.0,
                      help="how long to run (default 30)")
    demo.add_argument("--guest-mib", type=positive_int, default=512,
                      help="RAM of each guest, MiB (default 512)")
    demo.add_argument("--budget-mib", type=positive_int, default=1024,
                      help="host budget for all guests, MiB (default 1024)")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--journal", metavar="FILE",
                      help="keep the manager's decision journal here (JSON lines)")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_ram_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks (JSON out with --json)")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    bp = bsub.add_parser(
        "protocol",
        help="a driver/device pair on the virtual clock",
        description="Inflate one guest's balloon on the virtual clock (many guests: bench sim).",
    )
    bp.add_argument("--protocol", choices=["vmw", "vmw-batched", "virtio"], default="virtio")
    bp.add_argument("--guest-mib", type=positive_int, help="guest RAM, MiB")
    bp.add_argument("--balloon-mib", type=nonneg_int, help="balloon size to reach, MiB")
    bp.add_argument("--workload", choices=["idle", "busy"], default="idle")
    bp.add_argument("--max-cycles", type=positive_int, default=10_000,
                    help="stop after this many driver work periods (default 10000)")
    bp.add_argument("--json", action="store_true", help="print one JSON object")
    bp.set_defaults(func=_cmd_bench_protocol)
    for bench_area in ("memballoon.bench.policy", "memballoon.bench.fuzz", "memballoon.bench.sim",
                       "memballoon.bench.soak"):
        importlib.import_module(bench_area).register(bsub)
    importlib.import_module("memballoon.bench.host_pressure").register(bsub)
    br = bsub.add_parser(
        "reclaim",
        help="real memory: inflate a local guest to half its RAM and back, measured",
        description="One local guest touches its RAM; the host inflates its balloon to half "
                    "and deflates it again; the guest touches the pages again.",
    )
    br.add_argument("--protocol", choices=["vmw", "vmw-batched", "virtio"], default="virtio")
    br.add_argument("--guest-mib", type=positive_int, default=1024,
                    help="guest RAM, MiB (default 1024)")
    br.add_argument("--repeat", type=positive_int, default=1,
                    help="runs; report the one with the median ratio and list all (default 1)")
    br.add_argument("--json", action="store_true", help="print one JSON object")
    _add_ram_arguments(br)
    br.add_argument("--array-pfns", type=positive_int, default=None,
                    help="virtio: PFNs an array (default Linux's 256 with 4k RAM, 8192 = sixteen "
                         "2 MiB pages with huge pages)")
    br.set_defaults(func=_cmd_bench_reclaim)
    # each area adds its own subcommands (the qemu ones add `bench qemu` too)
    for area in ("memballoon.local.guest_main", "memballoon.app.daemon_cli",
                 "memballoon.app.qemu_cli", "memballoon.app.sim_cli"):
        importlib.import_module(area).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (MemballoonError, ValueError) as exc:
        print(f"memballoon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memballoon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
