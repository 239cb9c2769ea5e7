"""netstack: frames and what happens to them: the switch, ports and policies, the packet
formats (wire/), the hub's services (gateway/) and a TUN host's link layer (host/); no I/O."""

from netstack.frame import Frame, Offload
from netstack.port import Port, PortCounters, QueuedPort
from netstack.switch import Switch

__all__ = ["Frame", "Offload", "Port", "PortCounters", "QueuedPort", "Switch"]
