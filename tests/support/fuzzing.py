"""How long the fuzzers run.  The default test run gives each fuzz test its own example count
(a few seconds); `make fuzz` gives each VHOSTVPN_FUZZ_EXAMPLES examples and cuts each test
off after VHOSTVPN_FUZZ_SECONDS, so the long run ends in a known time."""

import functools
import os
import time
from collections.abc import Callable

from hypothesis import given, settings

# Seconds one fuzz test may run (unset: no bound, the example counts decide).
SECONDS: float | None = (float(os.environ["VHOSTVPN_FUZZ_SECONDS"])
                         if os.environ.get("VHOSTVPN_FUZZ_SECONDS") else None)
# Under a seconds bound, hypothesis runs in rounds (it has no time limit of its own): the
# first round is this many examples, later ones are sized from the rate seen so far to take
# a tenth of the bound, so a test overruns it by about that much at most.
FIRST_ROUND = 10
ROUNDS_PER_BOUND = 10


def examples(default: int) -> int:
    """A fuzz test's example count: `default` in the default run, VHOSTVPN_FUZZ_EXAMPLES in
    `make fuzz`."""
    return int(os.environ.get("VHOSTVPN_FUZZ_EXAMPLES", default))


class Budget:
    """The seconds bound of one fuzz test, started when it is made."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stop = None if SECONDS is None else self.start + SECONDS

    def spent(self) -> bool:
        return self.stop is not None and time.monotonic() >= self.stop

    def left(self) -> float:
        return float("inf") if self.stop is None else max(self.stop - time.monotonic(), 0.0)


def bounded_given(base: settings, *given_args: object,
                  **given_kwargs: object) -> Callable[[Callable], Callable]:
    """`@base @given(...)` in the default run.  Under VHOSTVPN_FUZZ_SECONDS, the same test in
    rounds of fresh examples until base.max_examples have run or the seconds are spent (a
    failing example fails the test and is shrunk as usual)."""

    def decorate(test: Callable) -> Callable:
        whole = base(given(*given_args, **given_kwargs)(test))
        if SECONDS is None:
            return whole

        @functools.wraps(whole)
        def in_rounds(*args: object, **kwargs: object) -> None:
            budget = Budget()
            done, size = 0, FIRST_ROUND
            while done < base.max_examples and not budget.spent():
                size = min(size, base.max_examples - done)
                one_round = settings(base, max_examples=size)(
                    given(*given_args, **given_kwargs)(test))
                one_round(*args, **kwargs)
                done += size
                rate = done / max(time.monotonic() - budget.start, 1e-3)
                size = max(1, int(rate * min(budget.left(), SECONDS / ROUNDS_PER_BOUND)))

        return in_rounds

    return decorate
