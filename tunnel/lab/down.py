"""`lab down`: stop a lab's processes (QEMU first, then the endpoints, then the hub) and
delete its namespaces and state, from what state.json recorded and the namespaces named
after the lab's tag (those a crashed `up` did not record too), and any of its veths' hub
ends left in the caller's namespace (a NAT lab's hub runs there).  Idempotent; needs only
the lab file's path, not its contents.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from tunnel.lab import netns
from tunnel.lab.processes import alive, stop
from tunnel.lab.state import State, lab_state_dir, lab_tag


def down(path: Path) -> bool:
    """Stop and remove the lab of the file at `path`; False if there was nothing to remove.
    Idempotent; needs only the file's path, not its contents."""
    directory, tag = lab_state_dir(path), lab_tag(path)
    state = State.load(directory)
    found = state is not None or directory.exists()
    if state is None:
        state = State(lab=str(Path(path).resolve()), tag=tag, dir=str(directory),
                      hub_netns=f"vvlab-{tag}-hub")
    # Namespaces named after this lab's tag, also those a crashed `up` did not record.
    stray = {ns for ns in netns.netns_list() if ns.startswith(f"vvlab-{tag}-")}
    found = found or bool(stray) or bool(netns.lab_links(tag))
    state.namespaces = sorted(set(state.namespaces) | stray)
    down_state(state)
    return found


def down_state(state: State) -> None:
    """Stop every process `state` records and delete its namespaces and state directory."""
    procs = [m.processes["qemu"] for m in state.members if "qemu" in m.processes]
    for group in (procs, [m.processes["endpoint"] for m in state.members
                          if "endpoint" in m.processes], [state.hub] if state.hub else []):
        for proc in group:  # SIGTERM them all, then wait
            if alive(proc):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in group:
            stop(proc)
    # A NAT lab's hub ends are in the caller's namespace: deleted here, at once (a deleted
    # namespace's veths go later, when the kernel gets round to it).
    netns.delete_links(state.tag)
    netns.delete(state.namespaces)  # deleting a namespace deletes its veth ends
    shutil.rmtree(state.dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the parent too, once no other lab uses it
        Path(state.dir).parent.rmdir()
