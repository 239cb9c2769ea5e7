"""`vhostvpn completion bash`: the script it prints, sourced in a real bash, completes the
subcommands, a subcommand's flags, flag values (choices, folders) and the example labs, and
stays out of the way after `--`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tunnel.cli.main import build_parser

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# COMP_WORDS/COMP_CWORD as bash sets them on TAB, then the registered function is called.
TRY = """
try() {
    COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
    local function=$(complete -p vhostvpn | sed -n 's/.*-F \\([^ ]*\\) .*/\\1/p')
    "$function" vhostvpn "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf '%s\\n' "${COMPREPLY[*]}"
}
"""


@pytest.fixture(scope="module")
def script() -> str:
    result = subprocess.run([sys.executable, "-m", "tunnel.cli", "completion", "bash"],
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout


def complete(script: str, *words: str, cwd: str | None = None) -> list[str]:
    """What TAB offers after `words` (the last one is the word being completed)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                             f"source /dev/stdin <<'EOS'\n{script}\nEOS\n{TRY}\ntry {quoted}"],
                            capture_output=True, text=True, timeout=30, cwd=cwd)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout.split()


def test_tab_offers_every_subcommand_of_the_parser(script):
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(complete(script, "vhostvpn", "")) == set(subcommands)
    assert complete(script, "vhostvpn", "ca") == ["capture"]
    assert set(complete(script, "vhostvpn", "lab", "")) == {
        "examples", "image", "up", "down", "status", "run"}


def test_tab_offers_a_subcommands_flags_after_its_flags_and_their_values(script):
    assert complete(script, "vhostvpn", "hub", "--so") == ["--socket", "--socket-group",
                                                          "--socket-mode"]
    assert complete(script, "vhostvpn", "hub", "--subnet", "10.77.0.0/24", "--p") == [
        "--peers", "--pcap"]
    assert complete(script, "vhostvpn", "capture", "--control", "/run/h.ctl", "--s") == [
        "--snaplen", "--seconds"]
    assert "--tap" in complete(script, "vhostvpn", "host", "--")
    assert "--tap" not in complete(script, "vhostvpn", "vm", "--")


def test_tab_completes_choices_folders_and_example_labs(script, tmp_path):
    assert complete(script, "vhostvpn", "hub", "--log-level", "") == [
        "debug", "info", "warning", "error"]
    assert complete(script, "vhostvpn", "completion", "") == ["bash"]
    assert "root" in complete(script, "vhostvpn", "hub", "--socket-group", "ro")
    (tmp_path / "keys").mkdir()
    (tmp_path / "kfile").write_text("")
    assert complete(script, "vhostvpn", "keygen", "k", cwd=str(tmp_path)) == ["keys"]
    assert complete(script, "vhostvpn", "lab", "up", "two", cwd=str(tmp_path)) == [
        "two-guests-one-host"]
    assert complete(script, "vhostvpn", "lab", "run", "x.toml", "vm1", "--", "pi") == []
