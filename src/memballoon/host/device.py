"""What every host-side balloon device offers the layers above it (harness, manager, backends).

A device's snapshot says which device it is (``device``: ``"vmw"`` or ``"virtio"``), so the
snapshots of several guests can be kept side by side and read back with
``device_snapshot_from_json`` without knowing beforehand which protocol each guest speaks.
"""

from __future__ import annotations

from typing import Annotated, Protocol

from pydantic import Field, TypeAdapter, ValidationError

from memballoon.host.hostpages import HostPages
from memballoon.host.virtio_device import VirtioDeviceSnapshot
from memballoon.host.vmw_device import VmwDeviceSnapshot
from memballoon.model.counters import Counters
from memballoon.model.errors import ConfigError
from memballoon.model.pages import PfnArray

#: Either device's snapshot, told apart by its ``device`` field.
DeviceSnapshot = Annotated[VmwDeviceSnapshot | VirtioDeviceSnapshot, Field(discriminator="device")]
_DEVICE_SNAPSHOT: TypeAdapter[VmwDeviceSnapshot | VirtioDeviceSnapshot] = TypeAdapter(
    DeviceSnapshot)


def device_snapshot_from_json(text: str | bytes) -> VmwDeviceSnapshot | VirtioDeviceSnapshot:
    """Parse and validate either device's snapshot; ConfigError (naming the field) if wrong."""
    try:
        return _DEVICE_SNAPSHOT.validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ConfigError(f"device snapshot: {where}: {err['msg']}") from None


class BalloonDevice(Protocol):
    counters: Counters  # rejected guest input and other events, by name

    def set_target(self, pages: int) -> None:
        """Ask for a balloon of ``pages`` 4 KiB pages (the core speaks balloon pages)."""
        ...

    @property
    def target_pages(self) -> int: ...

    @property
    def actual_pages(self) -> int:
        """The balloon size as the device knows it (virtio ``actual``; VMware: locked pages)."""
        ...

    def balloon_pfns(self) -> PfnArray:
        """Frames the device holds for the balloon, sorted (released, or in a partial host
        page with huge-page RAM)."""
        ...

    @property
    def partial_huge_pages(self) -> int:
        """Host huge pages some but not all of whose frames are in the balloon: kept, not
        released (``host/hostpages.py``); always 0 with 4 KiB host pages."""
        ...

    @property
    def release_owed_pages(self) -> int:
        """Balloon frames whose host memory a failed release still holds: retried at the next
        doorbell or by the transport's periodic retry (``HostPages.retry_releases``)."""
        ...

    @property
    def host_pages(self) -> HostPages:
        """The host pages behind the guest's RAM (``last_error``: memory the host lacked)."""
        ...

    def snapshot(self) -> VmwDeviceSnapshot | VirtioDeviceSnapshot:
        """What a restarted host needs to go on serving the guest (the device's ``restore``
        takes it back)."""
        ...
