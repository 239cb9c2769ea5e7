"""Test support: real peers for the code under test (QEMU, DPDK testpmd, a virtio driver model)."""
