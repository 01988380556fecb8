"""A virtio-balloon driver and device joined in one process (the pair harness's virtio link)."""

from __future__ import annotations

from memballoon.guest.memory import GuestMemory
from memballoon.guest.virtio_driver import VirtioBalloonDriver, driver_area_view
from memballoon.host.ram import RamBackend
from memballoon.host.virtio_device import SUPPORTED_FEATURES, VirtioBalloonDevice
from memballoon.protocol.virtio_transport import DirectTransport


def make_virtio(
    mem: GuestMemory, ram: RamBackend, *, features: int = SUPPORTED_FEATURES
) -> tuple[VirtioBalloonDriver, VirtioBalloonDevice]:
    """Driver and device over a 64 KiB view standing for the driver's area of guest RAM."""
    dev = VirtioBalloonDevice(ram, driver_area_view(mem.total_pages), features=features)
    return VirtioBalloonDriver(mem, DirectTransport(dev)), dev
