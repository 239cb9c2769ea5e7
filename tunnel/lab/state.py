"""state.json: what a running lab is made of (its members, their processes and addresses,
the namespaces it ever created), written by `up` as it goes and read by `down`, `status` and
`run`.

The state directory is found from the lab file's path alone (`lab_state_dir`), so a lab can
be stopped after its file was edited into something that no longer parses, or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tunnel.lab import LabError
from tunnel.lab.processes import Proc, alive

STATE_ROOT = Path(os.environ.get("VV_LAB_STATE_ROOT", "/run/vhostvpn-lab"))


def lab_tag(path: Path) -> str:
    """6 hex digits of the lab file's absolute path: its namespaces' and state's names."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:6]


def lab_state_dir(path: Path) -> Path:
    """Where a running lab keeps its state; found from the file's path alone, so `down`,
    `status` and `run` work even after the file was edited into something that no longer
    parses (or was deleted)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:40]
    return STATE_ROOT / f"{stem}-{lab_tag(path)}"


@dataclass
class Member:
    name: str
    kind: str  # guest | tap | tun
    netns: str
    veth: str
    link: str  # hub address on the veth: HOST:PORT
    control: str
    log: str
    socket: str = ""
    console: str = ""
    processes: dict[str, Proc] = field(default_factory=dict)  # endpoint, qemu
    address: str | None = None
    address6: str | None = None
    listen: str = ""  # its endpoint's --listen (a `direct = true` lab's LAN address)


@dataclass
class State:
    lab: str
    tag: str
    dir: str
    hub_netns: str  # "": the caller's namespace (a NAT lab's hub)
    hub: Proc | None = None
    hub_control: str = ""
    hub_listen: str = ""  # the hub's tunnel: HOST:PORT in hub_netns
    members: list[Member] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)  # all that were ever created

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, directory: Path) -> State | None:
        try:
            data = json.loads((directory / "state.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"{directory}/state.json: {exc}") from None
        members = []
        for m in data.pop("members"):
            procs = {k: Proc(**v) for k, v in m.pop("processes").items()}
            members.append(Member(**m, processes=procs))
        hub = data.pop("hub")
        return cls(**data, hub=Proc(**hub) if hub else None, members=members)

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise LabError(f"no member {name!r}; members: "
                       f"{', '.join(m.name for m in self.members)}")


def _asdict(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _asdict(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _asdict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_asdict(v) for v in obj]
    return obj


def load_state(path: Path) -> State:
    """The state `lab up` recorded for the lab file at `path`."""
    directory = lab_state_dir(path)
    state = State.load(directory)
    if state is None:
        raise LabError(f"lab {path} is not up (no {directory}/state.json)")
    return state


def format_lab(state: State) -> str:
    """The hub and each member of a running lab, one line each: addresses, namespace,
    console, and the processes that are not running."""
    where = (f"netns {state.hub_netns}" if state.hub_netns
             else f"the caller's namespace (NAT), tunnel on {state.hub_listen or '-'}")
    lines = [f"  hub    {where}, pid {state.hub.pid if state.hub else '-'}"
             + ("" if state.hub and alive(state.hub) else " (not running)")]
    for member in state.members:
        dead = [k for k, p in member.processes.items() if not alive(p)]
        lines.append(f"  {member.name:<6} {member.kind:<5} {member.address or '-':<18} "
                     f"netns {member.netns}"
                     + (f", ipv6 {member.address6}" if member.address6 else "")
                     + (f", console {member.console}" if member.console else "")
                     + (f" ({', '.join(dead)} not running)" if dead else ""))
    return "\n".join(lines)

