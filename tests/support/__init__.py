"""Test support: real peers for the code under test (QEMU guests, DPDK testpmd, a virtio driver model)."""
