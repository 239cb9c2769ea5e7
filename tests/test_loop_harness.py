"""bench/loop.py, the loop harness: its back-end variants, its medians, and (slow) one real
run per Python back-end -- testpmd mac-forwarding through bench/loop_forwarder.py and through
`vhostvpn hub` with VHOSTVPN_RING passed through -- with frames circulating and no traceback."""

from __future__ import annotations

import shutil

import pytest

from bench import loop


def test_ring_values_make_one_hub_and_one_forwarder_variant_each_and_leave_dpdk_alone():
    args = loop.parse_args(["--ring", "python,native", "--backends", "hub,forwarder,dpdk"])
    assert args.names == ["hub[ring=python]", "hub[ring=native]", "forwarder[ring=python]",
                          "forwarder[ring=native]", "dpdk"]
    assert loop.parse_args([]).names == ["hub", "forwarder", "dpdk"]


@pytest.mark.parametrize("argv", [["--ring", "fast"], ["--backends", "hub,ovs"],
                                  ["--burst", "512", "--queue-size", "512"],
                                  ["--sizes", "40"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        loop.parse_args(argv)


def test_medians_skip_failed_rounds_and_ratios_use_the_same_frame_size():
    runs = [loop.Run("hub", 64, 1, seconds=1, mpps=0.4, gbps=0.2),
            loop.Run("hub", 64, 2, seconds=1, mpps=0.6, gbps=0.3),
            loop.Run("hub", 64, 3, error="boom"),
            loop.Run("forwarder", 64, 1, seconds=1, mpps=1.0, gbps=0.5),
            loop.Run("forwarder", 1500, 1, seconds=1, mpps=0.1, gbps=1.2)]
    rows = loop.medians(runs, ["hub", "forwarder"], [64, 1500])
    hub = rows[0]
    assert (hub["mpps"], hub["rounds"], hub["failed"]) == (0.5, 2, 1)
    assert rows[2]["mpps"] is None  # hub at 1500 B: no round
    table = loop.markdown_table(rows)
    assert "| hub | 64 | 0.500 |" in table and "| 0.50 |" in table  # 0.5 / 1.0
    assert "| hub | 1500 | failed |" in table
    rows = loop.medians([loop.Run("hub[ring=native]", 64, 1, seconds=1, mpps=0.8),
                         loop.Run("forwarder[ring=native]", 64, 1, seconds=1, mpps=1.0),
                         loop.Run("forwarder", 64, 1, seconds=1, mpps=2.0)],
                        ["hub[ring=native]", "forwarder[ring=native]", "forwarder"], [64])
    assert "| 0.80 |" in loop.markdown_table(rows)  # against the forwarder on the same walk


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd missing")
@pytest.mark.parametrize("name", ["forwarder[ring=python]", "hub[ring=python]"])
async def test_frames_circulate_through_each_python_back_end(tmp_path, name):
    args = loop.parse_args(["--seconds", "1", "--warmup", "0.5"])
    run = await loop.measure(name, 64, 1, args, tmp_path)
    assert run.error is None, run
    assert run.frames > 1000
    assert run.tracebacks == 0 and run.broken == 0
    if name.startswith("hub"):
        log = (tmp_path / f"{name}-64-r1" / "backend.log").read_text()
        assert "listening on" in log
