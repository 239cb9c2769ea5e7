"""Hostile frames from a policed guest port against the whole segment (switch, policy,
gateway with its DHCP server, software offloads, an L3 host): nothing raises, nothing logs an
unexpected error, replies are well-formed, tables and queues stay bounded.

A few seconds by default; VHOSTVPN_FUZZ_EXAMPLES=N (and VHOSTVPN_FUZZ_SEED) for a long run,
bounded by VHOSTVPN_FUZZ_SECONDS, or bench/fuzz_frames.py, which also says what it found.
"""

import os

from tests.support import fuzzing
from tests.support.hostile_frames import fuzz

EXAMPLES = fuzzing.examples(20000)
SEED = int(os.environ.get("VHOSTVPN_FUZZ_SEED", "20240609"))


def test_hostile_frames_are_dropped_or_answered_never_raised(tmp_path):
    report = fuzz(EXAMPLES, SEED, tmp_path, fuzzing.Budget())
    # All of them, unless `make fuzz`'s seconds ran out first.
    assert report.cases == EXAMPLES or (fuzzing.SECONDS is not None and report.cases > 0)
    assert report.findings == {}
    # The generator reaches the code it is meant to: these guards all saw something.
    for reason in ("vlan_stacked", "ip_spoof", "mac_spoof", "nd_spoof", "malformed",
                   "oversize", "ra_guard", "dhcp_guard", "bad_source"):
        assert report.drops.get(reason), reason
