"""Installing vhostvpn: where the lab's files and the guest image are found, in a checkout and
installed (fast, tunnel/lab/assets.py), and a wheel built from this tree, installed into a fresh
virtualenv and run from a folder outside the checkout (slow): the commands work, the C fence
is compiled, `vhostvpn lab` finds its example labs and run-vm.sh as package data and brings
an example lab up and down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from tunnel.lab import assets

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 300.0
COMMAND_TIMEOUT = 60.0
LAB_UP_TIMEOUT = 240.0


# --- fast: tunnel/lab/assets.py in this checkout -----------------------------------------

def test_a_checkout_uses_its_qemu_folder_and_builds_the_image_into_qemu_build(monkeypatch):
    monkeypatch.delenv("VV_BUILD_DIR", raising=False)
    assert not assets.installed()
    assert assets.run_vm() == ROOT / "qemu" / "run-vm.sh"
    assert assets.build_image_script() == ROOT / "qemu" / "build_image.py"
    assert assets.image_dir() == ROOT / "qemu" / "build"
    monkeypatch.setenv("VV_BUILD_DIR", "/somewhere/else")
    assert assets.image_dir() == Path("/somewhere/else")


def test_installed_the_image_goes_to_a_cache_folder_never_next_to_the_package(
        monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "installed", lambda: True)
    monkeypatch.delenv("VV_BUILD_DIR", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.image_dir() == tmp_path / "vhostvpn" / "image"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert assets.image_dir() == Path("/var/cache/vhostvpn/image")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/vv:/other")
    assert assets.image_dir() == Path("/var/cache/vv/image")


def test_a_lab_argument_is_a_file_or_else_the_name_of_an_example(tmp_path, monkeypatch):
    example = ROOT / "qemu" / "labs" / "two-guests-one-host.toml"
    assert assets.resolve_lab("two-guests-one-host") == example
    assert assets.resolve_lab("two-guests-one-host.toml") == example
    assert {p.name for p in assets.example_labs()} >= {"two-guests-one-host.toml",
                                                       "guests-tap-tun.toml"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two-guests-one-host").write_text("")  # a file of that name wins
    assert assets.resolve_lab("two-guests-one-host") == Path("two-guests-one-host")
    assert assets.resolve_lab("no-such-lab") == Path("no-such-lab")
    assert assets.resolve_lab("dir/two-guests-one-host") == Path("dir/two-guests-one-host")


# --- slow: a wheel in a fresh virtualenv -------------------------------------------------

def _outside_env() -> dict[str, str]:
    """This environment without anything that would import the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.pop("VV_BUILD_DIR", None)
    return env


@pytest.fixture(scope="module")
def installed_venv():
    """A wheel of this tree (`pip wheel .`) installed with its dependencies into a fresh
    virtualenv; yields (its bin folder, a working folder outside the checkout)."""
    work = Path(tempfile.mkdtemp(prefix="pkg-wheel-"))
    try:
        wheels = work / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(wheels), str(ROOT)], check=True, timeout=PIP_TIMEOUT,
                       env=_outside_env())
        (wheel,) = wheels.glob("vhostvpn-*.whl")
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       timeout=COMMAND_TIMEOUT)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        str(wheel)], check=True, timeout=PIP_TIMEOUT, env=_outside_env())
        cwd = work / "elsewhere"
        cwd.mkdir()
        yield venv / "bin", cwd
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(bin_dir: Path, cwd: Path, *argv: str, env: dict[str, str] | None = None,
         timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    command = [str(bin_dir / argv[0]), *argv[1:]]
    return subprocess.run(command, cwd=cwd, env=env or _outside_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_the_installed_wheel_runs_outside_the_checkout(installed_venv):
    bin_dir, cwd = installed_venv
    where = _run(bin_dir, cwd, "python", "-c",
                 "import tunnel, virtio._fence, virtio._ring, tunnel.lab.assets as a;"
                 "print(tunnel.__file__); print(virtio._fence.__file__);"
                 "print(a.installed()); print(a.run_vm()); print(a.image_dir());"
                 "print(virtio._ring.__file__)")
    assert where.returncode == 0, where.stderr
    package, fence, installed, run_vm, image, ring = where.stdout.split("\n")[:6]
    site = str(bin_dir.parent / "lib")
    assert package.startswith(site) and not package.startswith(str(ROOT))
    assert fence.startswith(site) and fence.endswith(".so")  # compiled in the wheel build
    assert ring.startswith(site) and ring.endswith(".so")
    assert installed == "True" and run_vm.startswith(site)
    assert not image.startswith(site)  # a cache folder, not site-packages

    helped = _run(bin_dir, cwd, "vhostvpn", "--help")
    assert helped.returncode == 0 and "lab" in helped.stdout and "hub" in helped.stdout
    lab_help = _run(bin_dir, cwd, "vhostvpn", "lab", "--help")
    assert lab_help.returncode == 0 and "examples" in lab_help.stdout
    keygen = _run(bin_dir, cwd, "vhostvpn", "keygen", str(cwd / "key"))
    assert keygen.returncode == 0 and keygen.stdout.startswith("SHA256:"), keygen.stderr
    assert (cwd / "key").is_dir()

    completion = _run(bin_dir, cwd, "vhostvpn", "completion", "bash")
    assert completion.returncode == 0 and "complete -F _vhostvpn vhostvpn" in completion.stdout
    assert "two-guests-one-host" in completion.stdout  # the packaged example labs

    examples = _run(bin_dir, cwd, "vhostvpn", "lab", "examples")
    assert examples.returncode == 0
    listed = dict(line.split() for line in examples.stdout.splitlines())
    assert set(listed) == {"two-guests-one-host", "guests-tap-tun"}
    assert all(path.startswith(site) and Path(path).is_file() for path in listed.values())

    # the packaged run-vm.sh runs (executable bit kept) and boots from the image folder given
    assert os.access(run_vm, os.X_OK)
    image_dir = cwd / "image"
    image_dir.mkdir()
    (image_dir / "vmlinuz").touch()
    (image_dir / "initramfs.gz").touch()
    dry = subprocess.run([run_vm, "--socket", str(cwd / "vm.sock"), "--accel", "tcg",
                          "--dry-run"], cwd=cwd, env=_outside_env() | {"VV_BUILD_DIR":
                                                                       str(image_dir)},
                         capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert dry.returncode == 0, dry.stderr
    assert f"-kernel\n{image_dir}/vmlinuz\n-initrd\n{image_dir}/initramfs.gz" in dry.stdout

    # `lab status` of an example by name: it parses the packaged path, finds no state
    status = _run(bin_dir, cwd, "vhostvpn", "lab", "status", "guests-tap-tun")
    assert status.returncode == 1 and "is not up" in status.stderr
    assert listed["guests-tap-tun"] in status.stderr and "Traceback" not in status.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                    or shutil.which("ip") is None or shutil.which("qemu-system-x86_64") is None,
                    reason="needs root, /dev/net/tun, iproute2 and QEMU")
def test_the_installed_wheel_brings_an_example_lab_up_and_down(installed_venv):
    from tests.support.guest import ensure_image

    bin_dir, cwd = installed_venv
    env = _outside_env() | {"VV_BUILD_DIR": str(ensure_image()),  # not a second build
                            "VV_LAB_STATE_ROOT": str(cwd / "labs")}
    try:
        up = _run(bin_dir, cwd, "vhostvpn", "lab", "up", "two-guests-one-host", env=env,
                  timeout=LAB_UP_TIMEOUT)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "lab is up" in up.stdout
        ping = _run(bin_dir, cwd, "vhostvpn", "lab", "run", "two-guests-one-host", "vm1", "--",
                    "ping", "-c", "1", "-W", "5", "10.77.0.50", env=env)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        down = _run(bin_dir, cwd, "vhostvpn", "lab", "down", "two-guests-one-host", env=env)
    assert down.returncode == 0 and "down" in down.stdout, down.stdout + down.stderr
    assert not (cwd / "labs").exists() or not any((cwd / "labs").iterdir())


def test_every_package_folder_is_in_the_wheel_list():
    # pyproject lists packages by hand (tunnel.qemu maps to qemu/); a new folder left out
    # installs a wheel that cannot import it.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts)
               for top in ("netstack", "virtio", "tunnel")
               for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
