"""One booted NAT lab shared by the tests of a module (tests/test_qemu_nat.py): pytest-trio
runs each test in its own event loop, so the lab's processes and guests live in a trio loop of
their own on a background thread, and the (synchronous) tests call into it with `lab.run`.

The lab (tests/support/outside.py draws the namespaces):
  hub    `vhostvpn hub --nat` in the hub namespace, upstream DNS the outside's, TLS listener
         on HUB_LINK4, port forwards into g1 when the NAT takes them
  g1     QEMU guest on the hub's own vhost-user socket, static 10.77.0.50 and fd77::50
  tap    `vhostvpn host --tap` in the host namespace, 10.77.0.201 / fd77::201, the outside's
         prefixes routed via the gateway
  ep     `vhostvpn vm` in the host namespace; g2, a QEMU guest behind it, leases by DHCP
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from tests.support import outside
from tests.support.guest import Guest, wait_all_booted
from tests.support.hub import TunnelKeys, VhostvpnProcess

T = TypeVar("T")

G1_IP, G1_IP6 = "10.77.0.50", "fd77::50"
TAP_IP, TAP_IP6 = "10.77.0.201", "fd77::201"
GATEWAY, GATEWAY6 = "10.77.0.1", "fd77::1"
FORWARD_IN, FORWARD_OUT = 8022, 8023  # hub ports -> g1's 5000 (outside -> g1), 5001 (back)
BIG = 20 * 1024 * 1024
START_TIMEOUT = 180.0  # namespaces, three daemons, two TCG guests on two shared cores
STOP_TIMEOUT = 60.0


def nat_takes_forwards() -> bool:
    """Does this tree's NAT shell carry `--forward`s (the hub parses the flag either way)?"""
    from tunnel.nat import NatShell

    return "forwards" in inspect.signature(NatShell).parameters


@dataclass
class NatLab:
    """The lab's handles, filled in by `start`; `run(fn, *args)` from a test's thread."""

    work: Path
    tag: str
    names: dict[str, str] = field(default_factory=dict)
    big_sha256: str = ""
    hub: VhostvpnProcess | None = None
    tap: VhostvpnProcess | None = None
    ep: VhostvpnProcess | None = None
    g1: Guest | None = None
    g2: Guest | None = None
    g2_ip: str = ""
    forwards: bool = False

    def __post_init__(self) -> None:
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name=f"natlab-{self.tag}",
                                        daemon=True)

    # --- from the test's thread ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT + 30):
            raise TimeoutError(f"the NAT lab did not start within {START_TIMEOUT} s")
        if self._failure is not None:
            raise self._failure

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(*args)` in the lab's loop; its result or its exception."""
        assert self._token is not None
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(STOP_TIMEOUT)

    # --- in the lab's thread ------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start(), or seen at close()
            self._failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        folder = self.work / "www"
        folder.mkdir()
        self.big_sha256 = outside.write_random_file(folder / "big", BIG)
        (folder / "small").write_text("small\n")
        with outside.world(self.tag) as names:
            self.names = names
            async with contextlib.AsyncExitStack() as stack:
                # Every step is bounded on its own (guests own nurseries: no scope around them)
                await stack.enter_async_context(
                    outside.servers(names["outside"], folder, self.work))
                await self._start_processes(stack)
                self._ready.set()
                await self._stop.wait()

    async def _start_processes(self, stack: contextlib.AsyncExitStack) -> None:
        names, work = self.names, self.work
        keys = TunnelKeys(work, ("tap", "ep"))
        self.forwards = nat_takes_forwards()
        forward_args: list[str] = []
        if self.forwards:
            forward_args = ["--forward", f"tcp:{outside.HUB4}:{FORWARD_IN}:{G1_IP}:5000",
                            "--forward", f"tcp:{outside.HUB4}:{FORWARD_OUT}:{G1_IP}:5001"]
        self.hub = VhostvpnProcess(work, "hub", ["g1.sock"], keys.hub_args(
            "--nat", "--subnet", "10.77.0.0/24", "--ipv6-prefix", "fd77::/64",
            "--dns-upstream", outside.OUT4, "--state-dir", str(work / "state"), *forward_args,
            listen=outside.HUB_LINK4), "hub", prefix=outside.netns_exec(names["hub"]))
        in_host = outside.netns_exec(names["host"])
        self.tap = VhostvpnProcess(work, "host", [], keys.vm_args(
            "tap", "--tap", "vv0", "--address", f"{TAP_IP}/24", "--address", f"{TAP_IP6}/64",
            "--name", "tap", hub=outside.HUB_LINK4), "tap", prefix=in_host)
        self.ep = VhostvpnProcess(work, "vm", ["g2.sock"], keys.vm_args(
            "ep", "--name", "ep", hub=outside.HUB_LINK4), "ep", prefix=in_host)
        for process in (self.hub, self.tap, self.ep):
            await process.start()
            stack.push_async_callback(process.stop)
        for process in (self.tap, self.ep):
            await process.session_up()
        host = names["host"]
        outside.ip("-n", host, "route", "add", outside.PREFIX4, "via", GATEWAY, "dev", "vv0")
        outside.ip("-n", host, "-6", "route", "add", outside.PREFIX6, "via", GATEWAY6,
                   "dev", "vv0")
        self.g1 = Guest("natg1", socket=Path(self.hub.socket("g1.sock")), ip=f"{G1_IP}/24",
                        gw=GATEWAY, ip6=f"{G1_IP6}/64", stay=True, accel="tcg", log_dir=work)
        self.g2 = Guest("natg2", socket=Path(self.ep.socket("g2.sock")), dhcp=True, stay=True,
                        accel="tcg", log_dir=work)
        for guest in (self.g1, self.g2):
            await stack.enter_async_context(guest)
        _, boot2 = await wait_all_booted([self.g1, self.g2], timeout=START_TIMEOUT)
        if boot2.ip is None:
            raise RuntimeError(f"g2 booted without a DHCP lease:\n{self.g2.log_tail()}")
        self.g2_ip = boot2.ip.split("/")[0]
        # g1's IPv6 default route comes from the gateway's router advertisement.
        with trio.fail_after(30):
            while "default" not in await self.g1.check("ip -6 route show default"):
                await trio.sleep(0.5)
