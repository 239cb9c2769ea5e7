"""`vhostvpn lab`: a hub, QEMU guests and TAP/TUN hosts declared in one TOML file, started in
the background (`up`), driven (`run`, `status`) and removed without a trace (`down`).

Layout of a running lab (docs/lab.md):
* state directory /run/vhostvpn-lab/<stem>-<tag>/ (tag: 6 hex digits of the file's absolute
  path), holding keys/, peers, hub-state/, *.control, *.sock, *.console, logs/<member>.log
  and state.json (what `down` undoes: PIDs with their start times, namespaces);
* network namespace vvlab-<tag>-hub with the hub listening on :7777 (a NAT lab's hub runs
  in the caller's namespace instead, on a free port, so that its NAT reaches the machine's
  networks and its forwards listen on the machine), and one namespace vvlab-<tag>-<member>
  per member, joined to the hub's by a veth pair (10.199.N.1/24 on the hub's side,
  10.199.N.2/24 on the member's);
* per guest a `vhostvpn vm` endpoint in its namespace and QEMU (run-vm.sh, console on a
  unix socket) in the caller's; per host a `vhostvpn host --tap/--tun` in its namespace.
Every process runs in its own session (it outlives `lab up`) and is stopped by its recorded
PID: SIGTERM to its process group, SIGKILL after processes.STOP_TIMEOUT.

One module per concern:
  schema.py     the lab file: TOML in, a checked LabSpec out (no I/O but reading the file)
  state.py      state.json: what a running lab is made of, found from the file's path alone
  processes.py  the members' processes: spawned in their own session, checked, stopped
  netns.py      network namespaces and the veth pairs joining them (iproute2), planned
  image.py      the guest image and the environment of the QEMU tooling
  assets.py     where run-vm.sh, the image builder and the example labs are
  console.py    the test guest's serial-console protocol
  boot.py       waiting until every member has its addresses
  up.py, down.py, run.py   the lab's life: bring up, tear down, run a command in a member
  command.py    the `vhostvpn lab` argparse tree and its entry point (registered by
                tunnel/cli/, which this package never imports)
"""

from __future__ import annotations


class LabError(Exception):
    """A lab file that does not parse, or a lab that cannot be brought up or reached."""


def say(text: str) -> None:
    """One line of the lab's progress to stdout, flushed (the lab's commands are run from
    scripts that read it as it comes)."""
    print(text, flush=True)
