"""The exception tree.

    MemballoonError
    ├── UsageError              we (the caller) misused an API: a bug on our side
    ├── ConfigError             a config file or CLI argument is wrong (names key, value, unit)
    ├── HostResourceError       the host lacks what the run needs (huge pages off, a hugetlb
    │                           pool too small or run dry); says what to set
    └── PeerError               the other side misbehaved: untrusted input
        ├── FrameError          a malformed VMware backdoor frame
        ├── DescriptorError     a malformed virtqueue descriptor, chain or ring
        ├── GuestAddressError   an address, length or PFN outside the guest's memory
        ├── StatsError          a malformed stats buffer (bad length, unknown tag)
        └── DeviceConfigError   a malformed device config space (virtio: bad length)

A PeerError is always caught at the boundary that received the input, counted in a
``Counters`` bag, and answered with the protocol's own status where it has one.

``UsageError`` and ``ConfigError`` are also ``ValueError``s: a wrong value is what they report,
and the libraries at the edge expect one (pydantic turns a validator's ValueError into a
validation error naming the key; argparse turns a type function's into a usage message).
Nothing in memballoon raises a bare ``ValueError``: it raises one of these.
"""

from __future__ import annotations


class MemballoonError(Exception):
    """Base of every error memballoon raises on purpose."""


class UsageError(MemballoonError, ValueError):
    """An API was used in a way it does not allow (a bug in the caller)."""


class ConfigError(MemballoonError, ValueError):
    """A config file or command-line value is wrong."""


class HostResourceError(MemballoonError):
    """The host cannot provide what was asked: transparent huge pages for shmem turned off, too
    few huge pages reserved, a hugetlb pool that ran out mid-run. The message says what to set.
    ``unbacked`` lists the ``[start, end)`` frame ranges left without memory, when some were."""

    def __init__(self, message: str, unbacked: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.unbacked = unbacked


class PeerError(MemballoonError):
    """The peer (guest, device, hypervisor, QEMU) sent something malformed or hostile."""


class FrameError(PeerError):
    """A VMware backdoor frame that cannot be decoded."""


class DescriptorError(PeerError):
    """A virtqueue descriptor, chain or ring entry that breaks the VIRTIO rules."""


class GuestAddressError(PeerError):
    """An address, length or page frame number outside the guest's memory."""


class StatsError(PeerError):
    """A balloon statistics buffer that cannot be decoded."""


class DeviceConfigError(PeerError):
    """A device configuration space that cannot be decoded (wrong size, impossible value)."""
