"""The fake clock the sans-I/O cores take in tests: a callable returning seconds that the
test moves by setting `now`, or that advances `step` seconds on each reading."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 1_700_000_000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now
