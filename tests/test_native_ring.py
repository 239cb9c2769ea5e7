"""The native ring walk (virtio._ring) as a component: it agrees with the Python constants, it
refuses to touch guest memory once that is released, and the package runs without it (and
without virtio._fence) on the pure-Python fallbacks.  Its behaviour against the Python walk is
tested by the ring tests run over both and by the differential fuzzer (test_fuzz_virtio.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.virtio_driver import DriverQueue, GuestRam
from tests.test_vring import backend_memory
from virtio import vring
from virtio.spec import MAX_CHAIN_BUFFERS, MAX_INDIRECT_ENTRIES, MAX_MEM_REGIONS, MAX_QUEUE_SIZE
from virtio.vring import RingError, SplitQueue

ROOT = Path(__file__).resolve().parent.parent
native = pytest.mark.skipif(vring._ring is None, reason="virtio._ring is not built")


@native
def test_the_native_walk_uses_the_same_limits_as_the_python_one():
    ring = vring._ring
    assert (ring.WALK_BUDGET, ring.MAX_CHAIN_BUFFERS, ring.MAX_INDIRECT_ENTRIES,
            ring.MAX_QUEUE_SIZE, ring.MAX_MEM_REGIONS) == (
        vring.WALK_BUDGET, MAX_CHAIN_BUFFERS, MAX_INDIRECT_ENTRIES, MAX_QUEUE_SIZE,
        MAX_MEM_REGIONS)


@native
def test_a_native_ring_over_released_memory_raises_instead_of_reading_it():
    ram = GuestRam(1 << 20)
    q = DriverQueue(ram, 16, event_idx=True, indirect=True)
    memory, fds = backend_memory(ram)
    queue = SplitQueue(1, 16, memory, q.desc_uva, q.avail_uva, q.used_uva, 0, event_idx=True,
                       indirect=True, native=True)
    ring = queue.native
    try:
        memory.native_table().release()  # what memory.close() does first
        with pytest.raises(ValueError, match="released"):
            ring.pop(0, 8, 0)
        queue.release()
        with pytest.raises(ValueError, match="released"):
            ring.tx(0, 8, 0, 0, 26, 1526)
    finally:
        memory.close()
        for fd in fds:
            os.close(fd)
        ram.close()


def test_without_native_helpers_the_rings_use_python_and_a_lock_fence():
    script = (
        "import sys, logging\n"
        "sys.modules['virtio._ring'] = None\n"
        "sys.modules['virtio._fence'] = None\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from tests.test_vring import Pair, eth\n"
        "from virtio import vring\n"
        "assert vring.ring_implementation() == 'python'\n"
        "with Pair() as pair:\n"
        "    assert pair.tx.native is None\n"
        "    pair.driver.send([eth(1), eth(2)])\n"
        "    frames = pair.net.pop_tx(pair.tx, 8)\n"
        "    assert [f.data for f in frames] == [eth(1), eth(2)]\n"
        "    pair.tx.should_notify()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), VHOSTVPN_RING="native")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "virtio._ring is not built" in result.stderr
    assert "virtio._fence is not built" in result.stderr
    assert "virtio rings: python walk" in result.stderr


@native
def test_a_buffer_running_off_the_top_of_the_address_space_breaks_both_walks_alike():
    from tests.test_fuzz_virtio import TOP, Guest

    messages = []
    for walk in (False, True):
        guest = Guest(0, True, gpa_base=TOP, native=walk)
        try:
            guest.tx_q.write_desc(0, (1 << 64) - 100, 200, 0, 0)
            guest.tx_q.set_avail_entry(0, 0)
            guest.tx_q.set_avail_idx(1)
            with pytest.raises(RingError) as raised:
                guest.tx.pop(4)
            messages.append(str(raised.value))
        finally:
            guest.close()
    assert messages[0] == messages[1] == (
        "queue 1: descriptor 0: guest address 0x10000000000000000+0x64 is outside guest memory")


@pytest.mark.parametrize(("setting", "expected"), [
    ("python", "python"), ("native", "native"), (None, "native"), ("fast", "native")])
def test_vhostvpn_ring_selects_the_walk_native_by_default(monkeypatch, caplog, setting,
                                                          expected):
    if setting is None:
        monkeypatch.delenv(vring.RING_ENV, raising=False)
    else:
        monkeypatch.setenv(vring.RING_ENV, setting)
    built = vring._ring is not None
    assert vring._ring_from_environment() == (expected == "native" and built)
    assert ("none of native|python" in caplog.text) == (setting == "fast")


@native
def test_the_native_walk_leaks_nothing_on_its_error_paths():
    """Broken chains (a looping indirect table, a head outside the ring, an RX chain with no
    writable buffer) next to good ones, thousands of times: what the C code allocates (spans,
    chains, table copies, frames) is all given back, counted by tracemalloc."""
    import gc
    import struct
    import tracemalloc
    from collections import deque

    from netstack.frame import Frame
    from tests.test_fuzz_virtio import Guest

    guest = Guest(0, True, native=True)
    broken = 0

    def offer(q, device_queue, head):
        start = device_queue.last_avail_idx
        q.set_avail_entry(start % q.size, head)
        q.set_avail_idx((start + 1) & 0xFFFF)

    def rounds(count):
        nonlocal broken
        for _ in range(count):
            for head in (1, 0, 200):
                offer(guest.tx_q, guest.tx, head)
                try:
                    guest.net.pop_tx(guest.tx, 8)
                except RingError:
                    broken += 1
                    guest.tx.last_avail_idx = (guest.tx.last_avail_idx + 1) & 0xFFFF
            for head in (2, 3):
                offer(guest.rx_q, guest.rx, head)
                frames = deque([Frame(bytes(60)), Frame(bytes(60), (1, 0, 0, 0, 0, 0))])
                try:
                    guest.net.push_rx(guest.rx, frames, 8)
                except RingError:
                    broken += 1
                    guest.rx.last_avail_idx = (guest.rx.last_avail_idx + 1) & 0xFFFF

    try:
        table = guest.tables[0]
        guest.ram.write(table, struct.pack("<QIHH", guest.pool, 64, 1, 0) * 4)  # loops
        guest.tx_q.write_desc(0, table, 64, 4, 0)
        guest.tx_q.write_desc(1, guest.pool, 100, 0, 0)
        guest.rx_q.write_desc(2, guest.pool + 4096, 2048, 2, 0)
        guest.rx_q.write_desc(3, guest.pool, 100, 0, 0)  # readable: no room for a frame
        tracemalloc.start()
        try:
            rounds(200)
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            rounds(2000)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert broken == 2200 * 3
        assert after - before < 4096
    finally:
        guest.close()


@native
def test_a_chain_of_too_many_buffers_breaks_both_walks_alike():
    """1024 indirect descriptors, each straddling the boundary of two regions: 2048 buffers."""
    import struct

    from tests.test_fuzz_virtio import Guest

    messages = []
    for walk in (False, True):
        guest = Guest(0, True, native=walk)
        try:
            table = guest.tables[0]
            guest.ram.write(table, b"".join(
                struct.pack("<QIHH", guest.boundary - 1, 2, 1 if k < 1023 else 0, k + 1)
                for k in range(1024)))
            guest.tx_q.write_desc(0, table, 1024 * 16, 4, 0)
            guest.tx_q.set_avail_entry(0, 0)
            guest.tx_q.set_avail_idx(1)
            with pytest.raises(RingError) as raised:
                guest.tx.pop(4)
            messages.append(str(raised.value))
        finally:
            guest.close()
    assert messages[0] == messages[1] == "queue 1: chain 0 has too many buffers"
