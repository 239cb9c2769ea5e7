"""Host network configuration for a TUN/TAP endpoint: link up, MTU, MAC, addresses.

Who calls it: the host endpoint, after opening its device (tunnel.host.tuntap), and the tests
(inside a network namespace they created).  What it does: talks netlink through pyroute2 and
remembers every change it made, so that `undo()` puts the host back exactly as it was: the
addresses it added are removed, a link it brought up goes down again, an MTU it
changed is restored.  What it must never do: remove or alter anything it did not add itself
(an address that already existed is left alone and not recorded), or raise from
`undo()` because something is already gone.

Rules:
  * Every change is recorded *after* the kernel accepted it, as the action that reverses it;
    `undo()` runs them newest first and forgets each one as it goes, so it is idempotent and
    can be called again after a partial failure.
  * `undo()` is synchronous and safe from a signal handler or an `atexit` hook: it does its
    netlink work in a short-lived thread with its own socket, so it never re-enters a pyroute2
    call (and its asyncio loop) that the handler interrupted.
  * Netlink calls block for a round trip to the kernel (well under a millisecond); callers in
    a Trio loop make them during setup and teardown, not on the data path.
  * `netns` names a network namespace (as `ip netns` does) to configure instead of the
    current one; the product uses the current namespace, the tests their own.  It is never
    created here.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# linux/if.h
IFF_UP = 0x1

# Errors that mean "already gone" when undoing: the change is undone as far as we care.
_GONE_ERRNOS = frozenset({errno.ENODEV, errno.ESRCH, errno.ENOENT, errno.EADDRNOTAVAIL})

# How long undo() waits for its netlink thread.
UNDO_TIMEOUT_SECONDS = 10.0

Undo = Callable[[IPRoute], None]


class HostNetworkError(RuntimeError):
    """A configuration step failed; the message names the step and the kernel's answer."""


class HostNetwork:
    """Changes to one network namespace's links and addresses, undone on exit.

    with HostNetwork() as net:
        net.set_up("vhostvpn0", mtu=1500)
        net.add_address("vhostvpn0", ipaddress.ip_interface("10.77.0.5/24"))
        ...
    # everything above is removed again here, even after an exception
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._undo: list[tuple[str, Undo]] = []
        self._lock = threading.Lock()
        self._ipr: IPRoute | None = None

    # -- changes ----------------------------------------------------------------------------

    def set_mac(self, ifname: str, mac: bytes) -> None:
        """Give `ifname` the hardware address `mac` (the old one comes back on undo)."""
        ipr = self._socket()
        index = self._index(ipr, ifname)
        old_mac = ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS")
        wanted = mac.hex(":")
        if old_mac == wanted:
            return
        self._call(f"set MAC {wanted} on {ifname}", ipr.link, "set", index=index, address=wanted)
        self._record(
            f"restore MAC {old_mac} on {ifname}",
            lambda ipr: ipr.link("set", index=self._index(ipr, ifname), address=old_mac),
        )

    def set_up(self, ifname: str, mtu: int | None = None) -> None:
        """Set the MTU (if given) and bring the link up."""
        ipr = self._socket()
        index = self._index(ipr, ifname)
        link = ipr.link("get", index=index)[0]
        old_mtu = link.get("mtu")
        was_up = bool(link["flags"] & IFF_UP)
        if mtu is not None and mtu != old_mtu:
            self._call(f"set MTU {mtu} on {ifname}", ipr.link, "set", index=index, mtu=mtu)
            self._record(
                f"restore MTU {old_mtu} on {ifname}",
                lambda ipr: ipr.link("set", index=self._index(ipr, ifname), mtu=old_mtu),
            )
        if not was_up:
            self._call(f"bring {ifname} up", ipr.link, "set", index=index, state="up")
            self._record(
                f"bring {ifname} down",
                lambda ipr: ipr.link("set", index=self._index(ipr, ifname), state="down"),
            )

    def add_address(self, ifname: str, address: IPInterface) -> bool:
        """Add `address` (with its prefix) to `ifname`.  Returns False, and records nothing,
        when the link already had it."""
        ipr = self._socket()
        index = self._index(ipr, ifname)
        ip, prefixlen = str(address.ip), address.network.prefixlen
        try:
            ipr.addr("add", index=index, address=ip, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                log.info("%s already has %s: leaving it as it is", ifname, address)
                return False
            raise HostNetworkError(f"add address {address} to {ifname}: {exc}") from None
        self._record(
            f"remove address {address} from {ifname}",
            lambda ipr: ipr.addr(
                "del", index=self._index(ipr, ifname), address=ip, prefixlen=prefixlen
            ),
        )
        return True

    def remove_address(self, ifname: str, address: IPInterface) -> None:
        """Take back an address this object added (a lease that ended); one it did not add
        is left alone."""
        what = f"remove address {address} from {ifname}"
        for position, (recorded, action) in enumerate(self._undo):
            if recorded == what:
                del self._undo[position]
                ipr = self._socket()
                try:
                    action(ipr)
                except NetlinkError as exc:
                    if exc.code not in _GONE_ERRNOS:
                        raise HostNetworkError(f"{what}: {exc}") from None
                return

    # -- what the kernel says ---------------------------------------------------------------

    def link_state(self, ifname: str) -> dict[str, object]:
        """The kernel's view of `ifname`: administratively up, carrier, operstate (RFC 2863,
        as `ip link` shows it), MTU and addresses; for `vhostvpn status`."""
        ipr = self._socket()
        index = self._index(ipr, ifname)
        try:
            link = ipr.link("get", index=index)[0]
            addresses = ipr.get_addr(index=index)
        except NetlinkError as exc:
            raise HostNetworkError(f"read the state of {ifname}: {exc}") from None
        return {
            "admin_up": bool(link["flags"] & IFF_UP),
            "carrier": bool(link.get_attr("IFLA_CARRIER")),
            "operstate": link.get_attr("IFLA_OPERSTATE"),
            "mtu": link.get_attr("IFLA_MTU"),
            "addresses": [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in addresses],
        }

    # -- undo -------------------------------------------------------------------------------

    @property
    def changes(self) -> list[str]:
        """What undo() would reverse, oldest first."""
        return [what for what, _ in self._undo]

    def undo(self) -> None:
        """Reverse every recorded change, newest first.  Idempotent, synchronous, never raises
        for a change whose object is already gone (a TUN/TAP device closed before undo takes
        its addresses and routes with it); other failures are logged and skipped."""
        if not self._undo:
            self._close_socket()
            return
        worker = threading.Thread(target=self._undo_all, name="hostnet-undo", daemon=True)
        worker.start()
        worker.join(UNDO_TIMEOUT_SECONDS)
        if worker.is_alive():
            log.error("undoing network changes took over %.0f s: gave up", UNDO_TIMEOUT_SECONDS)
        self._close_socket()

    def close(self) -> None:
        self.undo()

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    # -- helpers ----------------------------------------------------------------------------

    def _undo_all(self) -> None:
        with self._lock:
            try:
                ipr = self._open()
            except Exception:
                log.exception("cannot open a netlink socket to undo network changes")
                return
            try:
                while self._undo:
                    what, action = self._undo.pop()
                    try:
                        action(ipr)
                    except NetlinkError as exc:
                        if exc.code not in _GONE_ERRNOS:
                            log.warning("cannot %s: %s", what, exc)
                    except HostNetworkError:
                        pass  # the link is gone, and the change with it
                    except Exception:
                        log.exception("cannot %s", what)
                    else:
                        log.info("undone: %s", what)
            finally:
                ipr.close()

    def _open(self) -> IPRoute:
        if self.netns is None:
            return IPRoute()
        return IPRoute(netns=self.netns, flags=0)  # flags=0: never create the namespace

    def _socket(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = self._open()
        return self._ipr

    def _close_socket(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            try:
                ipr.close()
            except Exception:
                log.debug("closing the netlink socket failed", exc_info=True)

    def _record(self, what: str, action: Undo) -> None:
        self._undo.append((what, action))
        log.debug("recorded for undo: %s", what)

    @staticmethod
    def _index(ipr: IPRoute, ifname: str) -> int:
        indices = ipr.link_lookup(ifname=ifname)
        if not indices:
            raise HostNetworkError(f"no network interface named {ifname!r}")
        return indices[0]

    @staticmethod
    def _call(what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except NetlinkError as exc:
            raise HostNetworkError(f"{what}: {exc}") from None

