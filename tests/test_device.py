"""Either device's snapshot read back by its ``device`` field."""

import json

import pytest

from memballoon.harness.pair import virtio_pair, vmw_pair
from memballoon.host.device import device_snapshot_from_json
from memballoon.host.virtio_device import VirtioDeviceSnapshot
from memballoon.host.vmw_device import VmwDeviceSnapshot
from memballoon.model.errors import ConfigError
from memballoon.model.units import mib_to_pages


def test_snapshots_of_both_devices_are_told_apart_by_their_device_field() -> None:
    vmw = vmw_pair(mib_to_pages(64), batched=True)
    virtio = virtio_pair(mib_to_pages(64))
    for p in (vmw, virtio):
        p.device.set_target(600)
        p.work()
    a = device_snapshot_from_json(vmw.device.snapshot().to_json())
    b = device_snapshot_from_json(virtio.device.snapshot().to_json())
    assert isinstance(a, VmwDeviceSnapshot) and a == vmw.device.snapshot()
    assert isinstance(b, VirtioDeviceSnapshot) and b == virtio.device.snapshot()
    bad = json.loads(b.to_json())
    bad["device"] = "xen"
    with pytest.raises(ConfigError, match="device snapshot"):
        device_snapshot_from_json(json.dumps(bad))
    bad["device"] = "vmw"  # a virtio snapshot that says it is a VMware one
    with pytest.raises(ConfigError):
        device_snapshot_from_json(json.dumps(bad))
