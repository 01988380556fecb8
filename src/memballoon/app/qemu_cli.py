"""``memballoon guest-image build``, ``memballoon vm start|list|stop|xml`` and ``bench qemu``.

``vm xml`` prints a libvirt domain for the test guest (``virsh create`` takes it), so the
libvirt world can be tried on a host with no VMs of its own.

``vm start`` launches QEMU detached (its own session: it outlives this command), writes
``vm.json`` beside its sockets, and registers the guest with the running manager over the
control socket (op ``register_qemu``). With no manager running it says so and leaves the VM
up, printing its QMP path, so a manager started later (or a person with socat) can take it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from memballoon.cliargs import positive_int
from memballoon.model.errors import ConfigError
from memballoon.model.units import MIB
from memballoon.qemu.image import build_guest_image
from memballoon.qemu.launch import QemuGuest, launch_and_attach

VM_FILE = "vm.json"


def default_vm_root() -> Path:
    """``$MEMBALLOON_VM_DIR``, else /tmp/memballoon-<uid>/vms (short: unix socket paths)."""
    env = os.environ.get("MEMBALLOON_VM_DIR")
    return Path(env) if env else Path(f"/tmp/memballoon-{os.getuid()}") / "vms"


def _say(msg: str) -> None:
    print(f"memballoon: {msg}", file=sys.stderr, flush=True)


def _out(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


def _cmd_image_build(args: argparse.Namespace) -> int:
    image = build_guest_image(args.dir)
    _out({"kernel_version": image.kernel_version, "vmlinuz": str(image.vmlinuz),
          "initramfs": str(image.initramfs)}, args.json)
    return 0


def _pid_is_qemu(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline.split(b"\0", 1)[0]


def _read_vm(vm_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((vm_dir / VM_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _cmd_vm_start(args: argparse.Namespace) -> int:
    max_mib = args.max_mib if args.max_mib is not None else args.mib
    if max_mib < args.mib:
        raise ConfigError(f"--max-mib {max_mib} is below --mib {args.mib}")
    guest = QemuGuest(args.name, max_mib=max_mib, start_mib=args.mib, accel=args.accel,
                      deflate_on_oom=args.deflate_on_oom,
                      free_page_reporting=args.free_page_reporting)
    vm_dir = (args.run_dir or default_vm_root()) / guest.name
    old = _read_vm(vm_dir)
    if old is not None and isinstance(old.get("pid"), int) and _pid_is_qemu(old["pid"]):
        raise ConfigError(f"VM {guest.name!r} already runs (pid {old['pid']}): "
                          f"`memballoon vm stop {guest.name}` first")
    image = build_guest_image(args.image_dir)

    async def start() -> tuple[int, str]:
        proc, qmp = await launch_and_attach(guest, image, vm_dir, timeout_s=10)
        await qmp.close()
        return proc.pid, proc.accel

    pid, accel = asyncio.run(start())
    info = {"name": guest.name, "pid": pid, "accel": accel, "qmp": str(vm_dir / "qmp.sock"),
            "agent": str(vm_dir / "agent.sock"), "console": str(vm_dir / "console.log"),
            "ram_bytes": guest.ram_bytes, "start_bytes": guest.start_bytes}
    (vm_dir / VM_FILE).write_text(json.dumps(info))
    why = "" if accel == "kvm" else " (KVM not usable for this guest here: software emulation)"
    _say(f"started {guest.name}: pid {pid}, accel {accel}{why}, {max_mib} MiB RAM"
         + (f", ballooned to {args.mib} MiB" if args.mib < max_mib else ""))
    info["registered"] = _register(args.socket, info)
    _out(info, args.json)
    return 0


def _register(socket_path: Path | None, info: dict[str, Any]) -> bool:
    from memballoon.app.config import default_socket_path
    from memballoon.app.control import ControlError, request

    path = socket_path if socket_path is not None else default_socket_path()
    try:
        request(path, "register_qemu", name=info["name"], qmp=info["qmp"],
                agent=info["agent"], ram_bytes=info["ram_bytes"])
    except ControlError as exc:
        _say(f"not registered with a manager: {exc}")
        _say(f"the VM keeps running; its QMP socket is {info['qmp']}")
        return False
    _say(f"registered {info['name']} with the manager at {path}")
    return True


def _cmd_vm_xml(args: argparse.Namespace) -> int:
    from memballoon.qemu.libvirt_backend import domain_xml

    max_mib = args.max_mib if args.max_mib is not None else args.mib
    if max_mib < args.mib:
        raise ConfigError(f"--max-mib {max_mib} is below --mib {args.mib}")
    image = build_guest_image(args.image_dir, qga=args.qga)
    print(domain_xml(args.name, image, max_mib=max_mib, current_mib=args.mib,
                     agent_path=None if args.agent is None else str(args.agent.resolve()),
                     qga=args.qga))
    return 0


def _cmd_vm_list(args: argparse.Namespace) -> int:
    root = args.run_dir or default_vm_root()
    vms = []
    for vm_dir in sorted(root.glob("*")) if root.is_dir() else []:
        info = _read_vm(vm_dir)
        if info is None:
            continue
        pid = info.get("pid")
        info["running"] = isinstance(pid, int) and _pid_is_qemu(pid)
        vms.append(info)
    if args.json:
        print(json.dumps(vms))
    else:
        for v in vms:
            state = "running" if v["running"] else "stopped"
            print(f"{v.get('name')}\t{state}\tpid {v.get('pid')}\t{v.get('accel')}\t"
                  f"{int(v.get('ram_bytes', 0)) // MIB} MiB\t{v.get('qmp')}")
    return 0


def _cmd_vm_stop(args: argparse.Namespace) -> int:
    vm_dir = (args.run_dir or default_vm_root()) / args.name
    info = _read_vm(vm_dir)
    if info is None:
        raise ConfigError(f"no VM named {args.name!r} under {vm_dir.parent}")
    pid = info.get("pid")
    if isinstance(pid, int) and _pid_is_qemu(pid):
        os.kill(pid, signal.SIGTERM)
        _say(f"stopped {args.name} (pid {pid})")
    else:
        _say(f"{args.name} was not running")
    (vm_dir / VM_FILE).unlink(missing_ok=True)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``guest-image``, ``vm`` and (under ``bench``) ``qemu`` to the CLI."""
    gi = sub.add_parser("guest-image", help="the small Linux test guest for QEMU")
    gisub = gi.add_subparsers(dest="guest_image", required=True, metavar="ACTION")
    gb = gisub.add_parser("build", help="build (or find cached) kernel + busybox initramfs")
    gb.add_argument("--dir", type=Path, default=None, help="image cache directory")
    gb.add_argument("--json", action="store_true")
    gb.set_defaults(func=_cmd_image_build)

    vm = sub.add_parser("vm", help="QEMU test guests with a virtio-balloon")
    vsub = vm.add_subparsers(dest="vm", required=True, metavar="ACTION")
    vs = vsub.add_parser("start", help="launch a guest and register it with the manager")
    vs.add_argument("--name", required=True)
    vs.add_argument("--mib", type=positive_int, required=True, help="size to start at, MiB")
    vs.add_argument("--max-mib", type=positive_int, default=None,
                    help="RAM the guest boots with (it can grow back up to it); default --mib")
    vs.add_argument("--deflate-on-oom", action="store_true")
    vs.add_argument("--free-page-reporting", action="store_true")
    vs.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    vs.add_argument("--socket", type=Path, default=None, help="the manager's control socket")
    vs.add_argument("--image-dir", type=Path, default=None)
    vs.add_argument("--run-dir", type=Path, default=None,
                    help="where VM directories live (default /tmp/memballoon-UID/vms)")
    vs.add_argument("--json", action="store_true")
    vs.set_defaults(func=_cmd_vm_start)
    vx = vsub.add_parser("xml", help="print a libvirt domain (TCG) for the test guest, for "
                         "`virsh create`")
    vx.add_argument("--name", required=True)
    vx.add_argument("--mib", type=positive_int, required=True, help="size to start at, MiB")
    vx.add_argument("--max-mib", type=positive_int, default=None, help="RAM; default --mib")
    vx.add_argument("--agent", type=Path, default=None,
                    help="unix socket for the memballoon agent channel (QEMU listens there)")
    vx.add_argument("--qga", action="store_true",
                    help="a QEMU guest agent channel, and qemu-ga in the guest image")
    vx.add_argument("--image-dir", type=Path, default=None)
    vx.set_defaults(func=_cmd_vm_xml)
    vl = vsub.add_parser("list", help="VMs started with `vm start`")
    vl.add_argument("--run-dir", type=Path, default=None)
    vl.add_argument("--json", action="store_true")
    vl.set_defaults(func=_cmd_vm_list)
    vt = vsub.add_parser("stop", help="stop a VM started with `vm start`")
    vt.add_argument("name")
    vt.add_argument("--run-dir", type=Path, default=None)
    vt.set_defaults(func=_cmd_vm_stop)

    bench = sub.choices.get("bench")
    if bench is not None:
        for action in bench._actions:
            if isinstance(action, argparse._SubParsersAction):
                from memballoon.bench.qemu import register as register_bench

                register_bench(action)


__all__ = ["default_vm_root", "register"]
