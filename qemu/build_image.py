#!/usr/bin/env python3
"""Build the test guest: Debian's cloud kernel plus a busybox initramfs with virtio-net and iperf3.

Run by hand (`python3 qemu/build_image.py`) or by tests/support/guest.py; outputs
qemu/build/vmlinuz and qemu/build/initramfs.gz. Standard library only; it never touches
the host outside qemu/build/ (apt-get download and dpkg -x only, no installs).

Steps, in the order they run:
  1. inputs  - ask apt-cache (local, no network) which kernel the linux-image-cloud-amd64
               meta package points at; hash guest-init, this script, busybox, iperf3 and
               its libraries. If the hash equals qemu/build/stamp, stop: nothing changed.
  2. kernel  - apt-get download the meta package's kernel package (cached in
               qemu/build/debs/), dpkg -x it, check the kernel config has what the guest
               needs built in (IPv6, AF_PACKET, devtmpfs, gzip initrd, 8250 console).
  3. modules - read the `depends=` field of each module's .modinfo ELF section (the deb
               ships no modules.dep; depmod runs at install time), take the virtio-net
               stack plus its dependencies, order them so dependencies load first,
               decompress .ko.xz/.ko.zst (busybox insmod loads plain .ko only).
  4. rootfs  - busybox from the busybox-static .deb (never the host's /bin/busybox, which
               may be the dynamic build) with a symlink per applet, /init (qemu/guest-init), the
               modules and their load order, iperf3 with every library ldd reports and
               the dynamic loader.
  5. archive - a cpio newc archive written here (device nodes without needing mknod;
               fixed owner and mtime so the same inputs give the same bytes), gzip -n.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

QEMU_DIR = Path(__file__).resolve().parent
BUILD_DIR = Path(os.environ.get("VV_BUILD_DIR", QEMU_DIR / "build"))
GUEST_INIT = QEMU_DIR / "guest-init"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# busybox comes from Debian's busybox-static package itself, not from the host's /bin: a
# host may have the dynamically linked `busybox` package installed instead (they conflict),
# and a dynamic busybox cannot run as the initramfs's /init shell.
BUSYBOX_PACKAGE = "busybox-static"
IPERF3 = Path("/usr/bin/iperf3")

# The virtio-net stack, by module name. Whatever of these the kernel builds as a module
# goes into the initramfs (with its dependencies); built-in ones are simply skipped.
WANTED_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
# Kernel options the guest cannot work without: they must be built in (=y).
REQUIRED_BUILTIN = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_PCI",
    "CONFIG_INET",
    "CONFIG_IPV6",
    "CONFIG_PACKET",
    "CONFIG_UNIX",
)
# Applets the guest init and the tests rely on; checked against `busybox --list`.
REQUIRED_APPLETS = (
    "sh", "mount", "insmod", "ip", "ping", "ping6", "udhcpc", "sha256sum", "dd", "nc",
    "stty", "base64", "hostname", "poweroff", "reboot", "cat", "sleep", "seq",
)

CPIO_MTIME = 0  # every archive member gets this mtime, so rebuilds are byte-identical


class BuildError(Exception):
    """A build step failed; the message says which step and what was seen."""


def log(message: str) -> None:
    """Progress on stderr, so stdout stays clean for callers that parse it."""
    print(f"build-image: {message}", file=sys.stderr, flush=True)


def run(argv: list[str], cwd: Path | None = None, quiet: bool = False) -> str:
    """Run a host command, return its stdout; raise BuildError with its stderr on failure."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if quiet else None,
        text=True,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()
        raise BuildError(f"command failed (rc={proc.returncode}): {' '.join(argv)}\n{detail}")
    return proc.stdout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- 1. inputs --------------------------------------------------------------------------


def apt_candidate(package: str) -> dict[str, str]:
    """Version and Depends of the candidate version of `package`, from the local apt cache."""
    try:
        out = run(["apt-cache", "show", "--no-all-versions", package], quiet=True)
    except BuildError as exc:
        raise BuildError(f"apt-cache has no package {package} (run apt-get update?): "
                         f"{exc}") from exc
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields.setdefault(key, value.strip())
    if "Version" not in fields:
        raise BuildError(f"apt-cache knows no candidate for {package}; run apt-get update")
    return fields


def kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel image the cloud meta package depends on."""
    meta = apt_candidate(KERNEL_META_PACKAGE)
    match = re.search(r"(linux-image-[0-9][^ ,()]*-cloud-amd64)\s*\(=\s*([^)]+)\)",
                      meta.get("Depends", ""))
    if not match:
        raise BuildError(
            f"{KERNEL_META_PACKAGE} {meta['Version']}: expected a dependency "
            f"'linux-image-<abi>-cloud-amd64 (= version)', saw Depends: {meta.get('Depends')!r}"
        )
    return match.group(1), match.group(2).strip()


def iperf3_files() -> list[Path]:
    """iperf3, every shared library ldd resolves for it, and the dynamic loader."""
    if not IPERF3.exists():
        raise BuildError(f"{IPERF3} not found: apt-get install iperf3")
    files = [IPERF3]
    for line in run(["ldd", str(IPERF3)], quiet=True).splitlines():
        line = line.strip()
        if "not found" in line:
            raise BuildError(f"ldd {IPERF3}: unresolved library: {line}")
        match = re.match(r"(?:\S+ => )?(/\S+) \(0x", line)
        if match:
            files.append(Path(match.group(1)))
    if not any(p.name.startswith("ld-linux") for p in files):
        raise BuildError(f"ldd {IPERF3} reported no dynamic loader: {files}")
    return files


def compute_inputs() -> dict[str, object]:
    if not GUEST_INIT.exists():
        raise BuildError(f"{GUEST_INIT} is missing")
    package, version = kernel_package()
    return {
        "kernel_package": package,
        "kernel_version": version,
        "guest_init": sha256_file(GUEST_INIT),
        "builder": sha256_file(Path(__file__)),
        "busybox": apt_candidate(BUSYBOX_PACKAGE)["Version"],
        "iperf3": {str(p): sha256_file(p) for p in iperf3_files()},
        "modules": list(WANTED_MODULES),
    }


def inputs_hash(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# --- 2. kernel --------------------------------------------------------------------------


def download_deb(package: str, version: str, debs: Path) -> Path:
    """apt-get download into the cache directory, unless that exact version is there."""
    debs.mkdir(parents=True, exist_ok=True)
    quoted_version = version.replace(":", "%3a")
    existing = sorted(debs.glob(f"{package}_{quoted_version}_*.deb"))
    if existing:
        log(f"using cached {existing[0].name}")
        return existing[0]
    log(f"downloading {package}={version} ...")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # apt-get download drops privileges to _apt when it can; a world-writable temp
        # dir avoids its "download is performed unsandboxed" warning.
        os.chmod(tmp, 0o777)
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=tmp, check=False)
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not got:
            raise BuildError(
                f"apt-get download {package}={version} produced no .deb "
                "(is a Debian mirror reachable? try apt-get update)"
            )
        target = debs / got[0].name
        os.replace(got[0], target)
    log(f"downloaded {target.name} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def extract_kernel(deb: Path, into: Path) -> tuple[Path, Path, Path]:
    """dpkg -x the kernel package; return (vmlinuz, config, modules dir)."""
    if into.exists():
        shutil.rmtree(into)
    log(f"extracting {deb.name}")
    run(["dpkg", "-x", str(deb), str(into)])
    vmlinuz = sorted((into / "boot").glob("vmlinuz-*"))
    config = sorted((into / "boot").glob("config-*"))
    moddirs = sorted((into / "lib" / "modules").glob("*"))
    if not (vmlinuz and config and moddirs):
        raise BuildError(f"{deb.name}: expected boot/vmlinuz-*, boot/config-*, lib/modules/*")
    return vmlinuz[0], config[0], moddirs[0]


def check_kernel_config(config: Path) -> None:
    values = dict(
        line.split("=", 1) for line in config.read_text().splitlines() if line.startswith("CONFIG_")
    )
    missing = [f"{opt} (is {values.get(opt, 'unset')})" for opt in REQUIRED_BUILTIN
               if values.get(opt) != "y"]
    if missing:
        raise BuildError(f"{config.name}: these must be built in (=y): {', '.join(missing)}")


# --- 3. modules -------------------------------------------------------------------------


def module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """The plain ELF bytes of a module, decompressing .ko.xz / .ko.zst / .ko.gz."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dc"], input=data, stdout=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise BuildError(f"zstd -dc {path} failed (is zstd installed?)")
        return proc.stdout
    if path.name.endswith(".ko"):
        return data
    raise BuildError(f"unknown module compression: {path}")


def modinfo_depends(elf: bytes, where: Path) -> list[str]:
    """The `depends=` list of the .modinfo section of a 64-bit little-endian ELF module."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise BuildError(f"{where}: not a 64-bit little-endian ELF object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + index * shentsize
        )
        return name, offset, size

    _, names_off, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = elf.index(b"\0", names_off + name)
        if elf[names_off + name:end] == b".modinfo":
            for entry in elf[offset:offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends="):].decode()
                    return [d.replace("-", "_") for d in value.split(",") if d]
            return []
    raise BuildError(f"{where}: no .modinfo section")


def collect_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """(name, ELF bytes) of the wanted modules and their dependencies, dependencies first."""
    available = {module_name(p): p for p in moddir.rglob("*.ko*") if ".ko" in p.name}
    builtin_file = moddir / "modules.builtin"
    builtin = {
        module_name(Path(line)) for line in builtin_file.read_text().split()
    } if builtin_file.exists() else set()

    ordered: list[tuple[str, bytes]] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in available:
            if name in builtin:
                return
            raise BuildError(f"module {name} (needed by {chain[-1]}) is neither a module "
                             "nor built in")
        state[name] = "visiting"
        elf = read_module(available[name])
        for dep in modinfo_depends(elf, available[name]):
            visit(dep, (*chain, name))
        state[name] = "done"
        ordered.append((name, elf))

    for name in WANTED_MODULES:
        if name in available:
            visit(name, ("(wanted)",))
        elif name not in builtin:
            log(f"note: {name} is neither a module nor built in; skipped")
    if "virtio_net" not in {n for n, _ in ordered} | builtin:
        raise BuildError("kernel has no virtio_net at all")
    return ordered


# --- 4. rootfs and 5. archive -----------------------------------------------------------


class Cpio:
    """A cpio "newc" archive writer: fixed uid/gid/mtime, inode numbers in insertion order."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 0
        self.names: set[str] = set()

    def _member(self, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        self.inode += 1
        fields = (self.inode, mode, 0, 0, 1, CPIO_MTIME, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._member("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name.strip("/")) or ".")
        self._member(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name.strip("/")) or ".")
        self._member(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._member(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._member("TRAILER!!!", 0)
        data = self.out.getvalue()
        return data + b"\0" * (-len(data) % 512)


def extract_busybox(deb: Path, into: Path) -> Path:
    """dpkg -x busybox-static; return its (statically linked) binary."""
    if into.exists():
        shutil.rmtree(into)
    run(["dpkg", "-x", str(deb), str(into)])
    binary = into / "bin" / "busybox"
    if not binary.is_file():
        raise BuildError(f"{deb.name}: no bin/busybox inside")
    with open(binary, "rb") as elf:
        head = elf.read(1 << 16)
    if b"/lib64/ld-linux" in head or b"ld-linux-x86-64.so" in head:
        raise BuildError(f"{deb.name}: bin/busybox is dynamically linked; the initramfs needs "
                         "a static one")
    return binary


def build_initramfs(modules: list[tuple[str, bytes]], kernel_release: str,
                    busybox: Path) -> bytes:
    archive = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "etc", "root", "var/log", "bin", "sbin",
              "usr/bin", "usr/sbin", "lib/modules"):
        archive.directory(d)
    # The kernel opens /dev/console for init's stdin/stdout before anything is mounted.
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3, 0o666)

    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = set(run([str(busybox), "--list-full"], quiet=True).split())
    missing = [a for a in REQUIRED_APPLETS
               if not any(p.rsplit("/", 1)[-1] == a for p in applets)]
    if missing:
        raise BuildError(f"{busybox} lacks applets: {' '.join(missing)}")
    for path in sorted(applets):
        if path != "bin/busybox":
            depth = path.count("/")
            archive.symlink(path, "../" * depth + "bin/busybox")

    archive.file("init", GUEST_INIT.read_bytes(), 0o755)
    archive.file("etc/hostname", b"vv\n")
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.file("etc/group", b"root:x:0:\n")
    archive.file("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")

    for name, elf in modules:
        archive.file(f"lib/modules/{name}.ko", elf)
    archive.file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in modules).encode())
    archive.file("lib/modules/release", f"{kernel_release}\n".encode())

    for path in iperf3_files():
        archive.file(str(path), path.read_bytes(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0)


# --- driver -----------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(force: bool = False) -> Path:
    """Build (or confirm up to date) qemu/build/{vmlinuz,initramfs.gz}; return BUILD_DIR."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs build once, the rest wait
        log("[1/5] checking inputs")
        inputs = compute_inputs()
        digest = inputs_hash(inputs)
        stamp = BUILD_DIR / "stamp"
        outputs = (BUILD_DIR / "vmlinuz", BUILD_DIR / "initramfs.gz")
        if (not force and all(p.exists() for p in outputs) and stamp.exists()
                and stamp.read_text().split("\n", 1)[0] == digest):
            log(f"up to date ({inputs['kernel_package']} {inputs['kernel_version']})")
            return BUILD_DIR

        log(f"[2/5] kernel {inputs['kernel_package']} {inputs['kernel_version']}")
        deb = download_deb(str(inputs["kernel_package"]), str(inputs["kernel_version"]),
                           BUILD_DIR / "debs")
        vmlinuz, config, moddir = extract_kernel(deb, BUILD_DIR / "kernel")
        check_kernel_config(config)

        log("[3/5] modules")
        modules = collect_modules(moddir)
        log("load order: " + " ".join(name for name, _ in modules))

        log("[4/5] initramfs")
        busybox_deb = download_deb(BUSYBOX_PACKAGE, str(inputs["busybox"]), BUILD_DIR / "debs")
        busybox = extract_busybox(busybox_deb, BUILD_DIR / "busybox")
        initramfs = build_initramfs(modules, moddir.name, busybox)

        log("[5/5] writing outputs")
        write_atomic(outputs[0], vmlinuz.read_bytes())
        write_atomic(outputs[1], initramfs)
        (BUILD_DIR / "modules.txt").write_text("".join(f"{n}\n" for n, _ in modules))
        shutil.rmtree(BUILD_DIR / "kernel")
        shutil.rmtree(BUILD_DIR / "busybox")
        write_atomic(stamp, (digest + "\n" + json.dumps(inputs, indent=1, sort_keys=True)
                             + "\n").encode())
        log(f"done: {outputs[0]} ({outputs[0].stat().st_size / 1e6:.1f} MB), "
            f"{outputs[1]} ({outputs[1].stat().st_size / 1e6:.1f} MB)")
        return BUILD_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        build(force=args.force)
    except BuildError as exc:
        log(f"FAILED: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
