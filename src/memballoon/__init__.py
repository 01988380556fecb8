"""memballoon: memory ballooning for virtual machines.

Layers (dependencies point inward only):
    model     units, page states, errors, counters
    protocol  pure codecs: VMware backdoor frames, virtio split virtqueues, virtio-balloon
    guest     guest memory model, workloads, the balloon drivers
    host      RAM backends, the balloon devices
    harness   a driver/device pair on a virtual clock, with invariant checks
    bench     benchmarks (JSON out)
    cli       the ``memballoon`` command

Nothing below ``harness`` touches sockets, threads, clocks or randomness: callers pass ``now``
and a seeded ``random.Random``.
"""

__version__ = "0.1.0"
