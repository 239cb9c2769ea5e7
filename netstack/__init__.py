"""netstack: frames and what happens to them (the switch, ports, gateway services); no I/O."""

from netstack.frame import Frame, Offload
from netstack.port import Port, PortCounters, QueuedPort
from netstack.switch import Switch

__all__ = ["Frame", "Offload", "Port", "PortCounters", "QueuedPort", "Switch"]
