"""Builds the native helpers of virtio/ (everything else is pyproject): virtio._fence, the
store->load fence of the rings, and virtio._ring, the native ring walk and copies.  Both are
optional: without a compiler the package installs and runs on the pure-Python fallbacks
(virtio/vring.py says which it uses, with a warning)."""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-Wall", "-Wextra"]

setup(
    ext_modules=[
        Extension("virtio._fence", sources=["virtio/_fence.c"], optional=True,
                  extra_compile_args=CFLAGS),
        Extension("virtio._ring", sources=["virtio/_ring.c"], optional=True,
                  extra_compile_args=CFLAGS),
    ]
)
