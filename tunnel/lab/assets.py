"""Where `vhostvpn lab` finds the guest tooling (run-vm.sh, build_image.py, guest-init, the
example labs) and where the built guest image goes, installed or in a source checkout.

Installed (a wheel): the files are package data in tunnel/qemu/ (pyproject.toml maps the
checkout's qemu/ there) and the image is built into a cache directory, never into
site-packages.  In a checkout: the files are qemu/ and the image is qemu/build/, as `make`
and the tests expect.  VV_BUILD_DIR overrides the image's folder in both cases.
"""

from __future__ import annotations

import os
from pathlib import Path

_TUNNEL = Path(__file__).resolve().parent.parent  # the tunnel package's folder
INSTALLED_QEMU_DIR = _TUNNEL / "qemu"  # package data of a wheel
CHECKOUT_QEMU_DIR = _TUNNEL.parent / "qemu"  # the source tree's qemu/
LAB_SUFFIX = ".toml"


def installed() -> bool:
    """Is this an installed copy (the guest tooling is package data)?"""
    return (INSTALLED_QEMU_DIR / "run-vm.sh").is_file()


def qemu_dir() -> Path:
    """The folder holding run-vm.sh, build_image.py, guest-init and labs/."""
    return INSTALLED_QEMU_DIR if installed() else CHECKOUT_QEMU_DIR


def run_vm() -> Path:
    return qemu_dir() / "run-vm.sh"


def build_image_script() -> Path:
    return qemu_dir() / "build_image.py"


def labs_dir() -> Path:
    return qemu_dir() / "labs"


def example_labs() -> list[Path]:
    """The example lab files shipped with vhostvpn, by name."""
    return sorted(labs_dir().glob("*" + LAB_SUFFIX))


def image_dir() -> Path:
    """Where the guest image (vmlinuz, initramfs.gz) is built and looked for:
    $VV_BUILD_DIR if set; in a checkout qemu/build/; installed, a cache directory:
    $CACHE_DIRECTORY (systemd's CacheDirectory=), /var/cache/vhostvpn/image as root, else
    $XDG_CACHE_HOME/vhostvpn/image (~/.cache/vhostvpn/image)."""
    if os.environ.get("VV_BUILD_DIR"):
        return Path(os.environ["VV_BUILD_DIR"])
    if not installed():
        return CHECKOUT_QEMU_DIR / "build"
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "image"
    if os.geteuid() == 0:
        return Path("/var/cache/vhostvpn/image")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "vhostvpn" / "image"


def resolve_lab(text: str | Path) -> Path:
    """A lab file argument: a path to a file, or else the name of an example lab
    ("two-guests-one-host", with or without .toml).  A name that matches neither is returned
    as given, so the caller's error names what the user typed."""
    path = Path(text)
    if path.exists() or os.sep in str(text):
        return path
    name = path.name if path.name.endswith(LAB_SUFFIX) else path.name + LAB_SUFFIX
    example = labs_dir() / name
    return example if example.is_file() else path
