"""Linux's own TCP as a guest: a network namespace whose only link is a TUN device we hold
the fd of (`kernel_behind_tun`), the client script that runs there (sends a seeded stream,
half-closes, reads the echo, prints both sha256s), and `Impairment`, seeded loss, duplication
and reordering of the frames between it and what it talks to."""

from __future__ import annotations

import random
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from netstack.frame import Offload
from tunnel.host.tuntap import TunTapDevice

KERNEL_IP = "10.203.0.1"


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextmanager
def kernel_behind_tun(offloads: Offload = Offload.NONE) -> Iterator[tuple[TunTapDevice, str]]:
    """A namespace (named after this worktree's helper, randomised) whose only link is a TUN
    device; we keep its fd and play 10.203.0.2 on it.  With TSO4 offered, the kernel sends us
    segments of up to 64 KiB with partial checksums, as a guest with TSO does."""
    tag = uuid.uuid4().hex[:6]
    ns = f"nattcp{tag}"
    dev = TunTapDevice.open(f"nattcp{tag}", "tun", offloads)
    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", "dev", dev.name, "netns", ns)
        run("ip", "-n", ns, "addr", "add", f"{KERNEL_IP}/24", "dev", dev.name)
        run("ip", "-n", ns, "link", "set", dev.name, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        yield dev, ns
    finally:
        dev.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


CLIENT = textwrap.dedent("""
    import hashlib, random, socket, sys, threading, time
    host, port, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rcvbuf, read_delay = int(sys.argv[5]), float(sys.argv[6])
    data = random.Random(seed).randbytes(size)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(40)
    s.connect((host, port))
    got = bytearray()
    def reader():
        time.sleep(read_delay)  # a reader that stalls: the window we send into closes
        while chunk := s.recv(65536):
            got.extend(chunk)
    t = threading.Thread(target=reader)
    t.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    t.join()
    print(hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), len(got))
""")


class Impairment:
    """Loss, duplication and reordering of frames, seeded: a reordered frame is held until
    the next one passes (a retransmission releases it at worst)."""

    def __init__(self, rng: random.Random, loss: float, dup: float, reorder: float) -> None:
        self.rng, self.loss, self.dup, self.reorder = rng, loss, dup, reorder
        self.held: bytes | None = None
        self.impaired = 0  # frames lost, duplicated or held back

    def __call__(self, packet: bytes) -> list[bytes]:
        rng = self.rng
        if rng.random() < self.loss:
            self.impaired += 1
            return []
        out = [packet, packet] if rng.random() < self.dup else [packet]
        self.impaired += len(out) - 1
        if self.held is None and rng.random() < self.reorder:
            self.impaired += 1
            self.held = packet
            return out[1:]
        if self.held is not None:
            out.append(self.held)
            self.held = None
        return out
