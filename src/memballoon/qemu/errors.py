"""Errors of the QEMU edge, placed in memballoon's tree (memballoon.model.errors).

    MemballoonError
    ├── ConfigError
    │   ├── HostToolMissingError   apt-get, dpkg-deb, busybox-static or QEMU is not installed
    │   └── GuestImageError        the guest kernel or image cannot be found or built
    └── PeerError
        ├── QmpError               QEMU's monitor misbehaved
        │   ├── QmpTimeoutError        no reply within the call's timeout
        │   ├── QmpReplyError          a reply that is malformed or lacks what it must carry
        │   ├── QmpCommandError        QEMU answered with an error class we do not expect
        │   ├── DeviceNotActiveError   no balloon device, or its driver is not there
        │   ├── BalloonStuckError      the balloon does not move toward its target
        │   └── GuestGoneError         QEMU exited or its socket cannot be reached any more
        ├── GuestBootError         QEMU exited or the guest did not reach READY in time
        ├── AgentError             a guest agent line that is garbage or too long
        │   └── GuestAgentError        the QEMU guest agent (qemu-ga) did not serve a read
        │       ├── QgaUnresponsiveError   absent (not running in the guest) or slow
        │       └── QgaRefusedError        it answered with an error (file missing, RPC blocked)
        └── LibvirtError           libvirtd refused a call or went away

Every PeerError raised here has bumped a named counter first (the caller's ``Counters``).
"""

from __future__ import annotations

from memballoon.model.errors import ConfigError, PeerError


class HostToolMissingError(ConfigError):
    """A host program the QEMU edge needs is missing; the message names the package."""


class GuestImageError(ConfigError):
    """The guest kernel, modules or image are missing or cannot be built."""


class QmpError(PeerError):
    """QEMU's QMP monitor did not behave."""


class QmpTimeoutError(QmpError):
    """A QMP call got no reply within its timeout."""


class QmpReplyError(QmpError):
    """A QMP reply is not JSON, or lacks a member, or a member has the wrong type."""


class QmpCommandError(QmpError):
    """QEMU refused a command with an error class other than the ones handled by name."""

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class DeviceNotActiveError(QmpError):
    """QMP error class DeviceNotActive: no balloon device, or no driver behind it."""


class BalloonStuckError(QmpError):
    """The balloon did not move toward its target (discard inhibited, or the guest is stuck)."""


class GuestGoneError(QmpError):
    """QEMU is gone: the QMP socket refused us, or dropped and could not be reopened."""


class GuestBootError(PeerError):
    """QEMU exited during boot, or the guest did not print its READY marker in time."""


class AgentError(PeerError):
    """A line from the in-guest agent that cannot be used."""


class GuestAgentError(AgentError):
    """The QEMU guest agent did not give what was asked (a garbage reply included)."""


class QgaUnresponsiveError(GuestAgentError):
    """The QEMU guest agent is not connected (not running in the guest) or did not answer
    in time."""


class QgaRefusedError(GuestAgentError):
    """The QEMU guest agent answered a command with an error."""


class LibvirtError(PeerError):
    """libvirtd refused a call, or the connection to it failed."""
