"""`vhostvpn status`: a running hub's or endpoint's state, asked over its control socket
(tunnel/control.py) and shown as text (`format_status`) or as the raw JSON.

`format_status` is the one rendering of that state; `vhostvpn capture` finds its process the
same way (`the_default_control`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tunnel.cli.flags import add_common


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The status subcommand."""
    status = sub.add_parser("status", help="show a running hub's or endpoint's state")
    status.add_argument("--control", metavar="PATH",
                        help="the process's control socket (default: every one answering in "
                             "/run/vhostvpn as root, else $XDG_RUNTIME_DIR/vhostvpn)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    add_common(status)


def cmd_status(args: argparse.Namespace) -> int:
    from tunnel.control import query

    if args.control:
        try:
            answers = {args.control: query(args.control)}
        except (OSError, ValueError) as exc:
            print(f"vhostvpn status: cannot reach {args.control}: {exc}", file=sys.stderr)
            return 1
    else:
        answers = query_default_controls()
    if args.json:
        if len(answers) > 1:
            raise SystemExit(f"vhostvpn status: {len(answers)} processes answer "
                             f"({', '.join(answers)}): give --control PATH")
        print(json.dumps(next(iter(answers.values())), indent=2))
        return 0
    print("\n\n".join(f"{path}:\n{format_status(state)}" if len(answers) > 1
                      else format_status(state) for path, state in answers.items()))
    return 0


def query_default_controls(command: str = "status") -> dict[str, dict]:
    """The status of every process answering on a default control socket (tunnel/control.py;
    sockets nobody answers on are left by killed processes and skipped); exit status 1 with
    what to do when there is none."""
    from tunnel.control import control_sockets, query, runtime_dir

    answers = {}
    for path in control_sockets():
        try:
            answers[str(path)] = query(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        except (OSError, ValueError) as exc:
            raise SystemExit(f"vhostvpn {command}: cannot reach {path}: {exc}") from None
    if not answers:
        raise SystemExit(f"vhostvpn {command}: no vhostvpn process answers in {runtime_dir()} "
                         f"(give --control PATH if it was started with one)")
    return answers


def the_default_control(command: str) -> str:
    """The control socket when --control is not given and one process answers on a default
    one; exit status 1 naming them when there are several."""
    answers = query_default_controls(command)
    if len(answers) > 1:
        raise SystemExit(f"vhostvpn {command}: {len(answers)} processes answer "
                         f"({', '.join(answers)}): give --control PATH")
    return next(iter(answers))


def format_status(state: dict) -> str:
    lines = [f"{state.get('role', '?')} (pid {state.get('pid', '?')})"
             + (f", key {state['fingerprint']}" if state.get("fingerprint") else "")]
    session = state.get("session")
    if session is not None:
        rtt = session.get("rtt_ms")
        lines.append(
            f"  session to {state.get('hub')}: {session['state']}"
            + (f", rtt {rtt:.2f} ms" if rtt is not None else "")
            + f", {session.get('reconnects', 0)} reconnects"
            + (f", last error: {session['last_error']}" if session.get("last_error") else ""))
    direct = state.get("direct")
    if direct is not None:
        lines += _format_direct(direct)
    tunnel = state.get("tunnel")
    if tunnel is not None:
        refused = ", ".join(f"{k}={v}" for k, v in sorted(tunnel.get("refused", {}).items()))
        direct = tunnel.get("direct", {})
        lines.append(f"  tunnel on {', '.join(tunnel['listen'])}: {tunnel['peers']} peers, "
                     f"key {tunnel['fingerprint']}" + (f", refused {refused}" if refused else "")
                     + (f", introductions {'on' if direct['enabled'] else 'off'}"
                        if direct else ""))
        lines += _format_offline_peers(tunnel.get("peer_list", []))
    for port in state.get("ports", []):
        drops = port.get("drops", {}) | port.get("guest_drops", {})
        traffic = (f"in {port['in_frames']} frames/{port['in_bytes']} B, "
                   f"out {port['out_frames']} frames/{port['out_bytes']} B")
        if port.get("software_offloads"):
            traffic += f", {port['software_offloads']} offloaded in software"
        if drops:
            traffic += ", drops " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
        if port.get("kind") == "gateway":
            lines.append(f"  {port['name']}: {traffic}")
            services = port.get("services", {}) | {
                f"dhcp_{k}": v for k, v in port.get("dhcp", {}).items()}
            if services:
                lines.append("    answered: " + ", ".join(
                    f"{k}={v}" for k, v in sorted(services.items())))
            continue
        if port.get("kind") == "session":
            rtt = port.get("rtt_ms")
            lines.append(f"  {port['name']}: session {port.get('state')}"
                         + (f" from {port['peer']}" if port.get("peer") else "")
                         + (f", rtt {rtt:.2f} ms" if rtt is not None else "")
                         + f", {traffic}")
            direct = port.get("direct")
            if direct is not None:
                lines.append(f"    direct: advertised {', '.join(direct['advertised']) or 'none'}"
                             f", {direct['introduced']} peers introduced to it, introduced to "
                             f"{direct['introduced_to']}")
            continue
        if port.get("kind") in ("tap", "tun"):
            lines += _format_device(port, traffic)
            continue
        link = "up" if port.get("link_up") else "down"
        broken = f" BROKEN: {port['broken']}" if port.get("broken") else ""
        lines.append(f"  {port['name']}: link {link}{broken}, features "
                     f"{port.get('features', '-')}, {traffic}")
    if state.get("nat") is not None:
        lines += _format_nat(state["nat"])
    macs = state.get("macs", [])
    if macs:
        lines.append("  MAC table:")
        lines.extend(f"    {m['mac']} -> {m['port']} "
                     + ("(pinned)" if m["age"] is None else f"(seen {m['age']} s ago)")
                     for m in macs)
    return "\n".join(lines)


def _format_direct(direct: dict) -> list[str]:
    """An endpoint's direct paths: where it listens, then each introduced peer, direct or
    relayed through the hub, with its address, rtt, traffic and drops."""
    if not direct.get("listen") and not direct.get("peers"):
        return []  # no --listen, nobody introduced: nothing to say
    refused = ", ".join(f"{k}={v}" for k, v in sorted(direct.get("refused", {}).items()))
    listen = ", ".join(direct.get("listen", [])) or "not listening"
    lines = [f"  direct paths: {listen}, {len(direct.get('peers', []))} peers introduced"
             + (f", refused {refused}" if refused else "")]
    for peer in direct.get("peers", []):
        rtt = peer.get("rtt_ms")
        drops = ", ".join(f"{k}={v}" for k, v in sorted(peer.get("drops", {}).items()))
        where = peer.get("address") if peer.get("path") == "direct" else None
        lines.append(
            f"    {peer['name']}: {peer['path']}" + (f" via {where}" if where else "")
            + f" ({peer['state']}, {peer['role']}"
            + {"us": ", dialled by us", "peer": ", dialled by the peer"}.get(
                peer.get("dialled_by") or "", "") + ")"
            + (f", rtt {rtt:.2f} ms" if rtt is not None and where else "")
            + f", in {peer['in_frames']} frames/{peer['in_bytes']} B, "
              f"out {peer['out_frames']} frames/{peer['out_bytes']} B"
            + (f", drops {drops}" if drops else "")
            + (f", last error: {peer['last_error']}"
               if peer.get("last_error") and peer["path"] != "direct" else ""))
    return lines


def _format_device(port: dict, traffic: str) -> list[str]:
    """A host's TAP or TUN port: the kernel's view of the device, its addresses (a leased
    one named), then the traffic."""
    kernel = port.get("kernel", {})
    if "error" in kernel:
        link = f"link unknown ({kernel['error']})"
    elif kernel:
        link = (f"link {'up' if kernel.get('admin_up') else 'down'}, carrier "
                f"{'on' if kernel.get('carrier') else 'off'}, operstate "
                f"{kernel.get('operstate')}, mtu {kernel.get('mtu')}")
    else:
        link = "link unknown"
    lines = [f"  {port['name']} ({port['kind']}): {link}"]
    dhcp = port.get("dhcp")
    if dhcp is not None:
        lines.append(f"    DHCP {dhcp.get('state')}"
                     + (f", leased {dhcp['address']}" if dhcp.get("address") else ""))
    addresses = kernel.get("addresses")
    if addresses is not None:
        lines.append(f"    addresses: {', '.join(addresses) or 'none'}")
    lines.append(f"    {traffic}")
    return lines


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _format_nat(nat: dict) -> list[str]:
    """The hub's NAT: its flows by protocol, DNS, what it dropped and refused (NAT-wide, by
    reason), then what each guest holds in it (by port: a guest's caps are its port's), and
    the port forwards."""
    tcp, dns = nat.get("tcp", {}), nat.get("dns", {})
    states = _counts(tcp.get("states", {}))
    lines = [f"  NAT: tcp {tcp.get('flows', 0)} flows" + (f" ({states})" if states else "")
             + f", udp {nat.get('udp', {}).get('flows', 0)}, echo "
             + (f"{nat.get('echo', {}).get('flows', 0)}"
                if any(nat.get("echo_on", {}).values()) else "off")
             + f", dns {dns.get('answered', 0)} answered/{dns.get('pending', 0)} pending "
             f"via {', '.join(dns.get('upstreams', [])) or 'none'}"]
    drops = {**nat.get("drops", {})}
    for table in ("tcp", "udp", "echo", "dns"):
        for reason, count in nat.get(table, {}).get("drops", {}).items():
            drops[f"{table}_{reason}"] = count
    drops |= {f"socket_{k}": v for k, v in nat.get("socket_errors", {}).items()}
    if drops:
        lines.append(f"    drops {_counts(drops)}")
    if nat.get("refusals"):
        lines.append(f"    refused {_counts(nat['refusals'])}")
    for port, held in sorted(nat.get("ports", {}).items()):
        flows = _counts(held.get("flows", {})) or "no flows"
        macs = len(held.get("macs", {}))
        lines.append(f"    {port}: {flows}, {held.get('half_open', 0)} half-open, "
                     f"{held.get('buffered', 0)} B buffered, {held.get('dns_pending', 0)} "
                     f"DNS pending, {held.get('lingering', 0)} lingering, "
                     f"{macs} MAC{'' if macs == 1 else 's'}")
    for forward in nat.get("forwards", []):
        state = ""
        if "listening" in forward:
            state = (f": {'listening' if forward['listening'] else 'NOT listening'}, "
                     f"{forward.get('active', 0)} active")
        counters = _counts(forward.get("counters", {}))
        lines.append(f"    forward {forward['forward']}{state}"
                     + (f", {counters}" if counters else ""))
    return lines


def _format_offline_peers(peers: list[dict]) -> list[str]:
    """The peers file's peers that are not connected: when each was last seen, from where,
    with which addresses on the segment."""
    offline = [peer for peer in peers if not peer.get("online")]
    if not offline:
        return []
    lines = ["  offline peers:"]
    for peer in offline:
        if peer.get("last_seen") is None:
            lines.append(f"    {peer['name']}: not seen since the hub started")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(peer["last_seen"]))
        ago = _ago(time.time() - peer["last_seen"])
        lines.append(f"    {peer['name']}: last seen {when} ({ago} ago) from {peer.get('from')}"
                     + (f", addresses {', '.join(peer['addresses'])}"
                        if peer.get("addresses") else ""))
    return lines


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"
