"""A token bucket: `rate` tokens a second, at most `burst` saved up; `take(now)` spends one if
there is one (`take(now, cost)`: that many).  The one rate limiter of the project: a port's
broadcast and service budgets (netstack/policy.py), a DHCP client's messages
(netstack/gateway/dhcp_server.py), a source's handshakes (tunnel/listener.py).  Sans-I/O: the
caller passes the time."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("burst", "rate", "refilled", "tokens")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst  # a new bucket starts full
        self.refilled = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens, if they have accrued by `now` (a clock that steps back adds
        none).  A cost above `burst` is never paid."""
        tokens = min(self.burst, self.tokens + max(0.0, now - self.refilled) * self.rate)
        self.refilled = now
        if tokens < cost:
            self.tokens = tokens
            return False
        self.tokens = tokens - cost
        return True
