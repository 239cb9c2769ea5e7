"""`vhostvpn capture PORT`: stream pcapng of one port of a running hub or endpoint to stdout
(tunnel/capture.py speaks the protocol; here are the flags and the ends: a reader that goes
away, Ctrl-C, a process that cannot be reached).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tunnel.cli.flags import add_common
from tunnel.cli.status import the_default_control

log = logging.getLogger("vhostvpn")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from netstack.pcap import DEFAULT_SNAPLEN, MAX_SNAPLEN

    capture = sub.add_parser(
        "capture", help="stream pcapng of one port of a running hub or endpoint to stdout",
        description="Stream what PORT sends and receives as pcapng to stdout, e.g. "
                    "`vhostvpn capture --control /run/hub.ctl vm1 | wireshark -k -i -`. "
                    "PORT is a name `vhostvpn status` shows (a peer, gateway, a socket's "
                    "file name with or without .sock).")
    capture.add_argument("port", metavar="PORT")
    capture.add_argument("--control", metavar="PATH",
                         help="the hub's or endpoint's control socket (default: the one "
                              "process answering on a default control socket, as for status)")
    capture.add_argument("--snaplen", type=int, default=DEFAULT_SNAPLEN, metavar="BYTES",
                         help=f"keep at most BYTES of each frame (1-{MAX_SNAPLEN}, default "
                              f"{DEFAULT_SNAPLEN}: whole frames)")
    capture.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    capture.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    add_common(capture)


def cmd_capture(args: argparse.Namespace) -> int:
    from netstack.pcap import MAX_SNAPLEN
    from tunnel.capture import CaptureError, stream_capture

    if not 1 <= args.snaplen <= MAX_SNAPLEN:
        raise SystemExit(f"vhostvpn capture: --snaplen {args.snaplen}: want 1 to {MAX_SNAPLEN}")
    if args.count is not None and args.count < 1:
        raise SystemExit(f"vhostvpn capture: --count {args.count}: want at least 1")
    if sys.stdout.isatty():
        raise SystemExit("vhostvpn capture: stdout is a terminal: pipe it (| wireshark -k -i -"
                         ", | tshark -r -) or redirect it (> FILE.pcapng)")
    if args.control is None:
        args.control = the_default_control("capture")
    try:
        port, frames = stream_capture(args.control, args.port, sys.stdout.buffer,
                                      snaplen=args.snaplen, count=args.count,
                                      seconds=args.seconds)
    except CaptureError as exc:
        raise SystemExit(f"vhostvpn capture: {exc}") from None
    except BrokenPipeError:  # the reader (wireshark, head) went away: a normal end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        raise SystemExit(f"vhostvpn capture: cannot reach {args.control}: {exc}") from None
    except KeyboardInterrupt:
        return 0
    log.info("capture of %s: %d frames", port, frames)
    return 0
