"""QEMU edge: the test guest image, the launcher, the QMP client and the guest agent reader."""
