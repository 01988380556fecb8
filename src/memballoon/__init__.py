"""memballoon: memory ballooning for virtual machines.

Layers, lowest first (a package imports only the layers below it and its own; the README's
"Layers" section draws the same map and tests/test_layers.py checks it):

    model     units, page states, page sets, errors, declared counters, snapshot base
    protocol  pure codecs: VMware backdoor frames, virtio virtqueues and balloon, wire
              framing, pressure reports, the kernel's memory files
    guest     guest memory model, workloads, the balloon drivers
    host      RAM backends, the balloon devices, memory cgroups
    harness   a driver/device pair on a virtual clock, with invariant checks
    policy    pure policies over GuestSample/HostSample records
    manager   the engine (one synchronous step over a backend port and a clock), the core
    edge      the real clock, the journal and state files, host memory probes, the asyncio
              shell
    local, qemu, sim   the worlds (backends)
    app, bench, cli    composition roots: the daemon, the demo, the benchmarks, the command

Nothing below ``edge`` touches sockets, threads, clocks or randomness: callers pass ``now``
and a seeded ``random.Random``.
"""

__version__ = "0.1.0"
