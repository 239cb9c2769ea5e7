"""Builds the one native helper, virtio._fence (a memory fence); everything else is pyproject."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("virtio._fence", sources=["virtio/_fence.c"])])
