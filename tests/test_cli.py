"""The command line: QEMU options, bad flags refused with a clear message, status rendering."""

import subprocess
import sys

import pytest

from tunnel.cli.main import main
from tunnel.cli.qemu import default_mac
from tunnel.cli.status import format_status


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", *args], capture_output=True,
                          text=True, timeout=30)


def test_qemu_args_attach_a_nic_to_the_socket(capsys):
    assert main(["qemu-args", "--socket", "/run/vm1.sock", "--mem", "2G", "--queues", "2",
                 "--vectors", "0", "--mac", "52:54:00:00:00:01"]) == 0
    out = capsys.readouterr().out.split()
    assert "memory-backend-memfd,id=net0-mem,size=2G,share=on" in out
    assert "socket,id=net0,path=/run/vm1.sock,reconnect=1" in out
    assert "vhost-user,id=net0,chardev=net0,queues=2" in out
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,mq=on,vectors=0" in out


def test_default_mac_is_stable_and_locally_qemu_like():
    assert default_mac("/run/a.sock") == default_mac("/run/a.sock")
    assert default_mac("/run/a.sock") != default_mac("/run/b.sock")
    assert default_mac("/run/a.sock").startswith("52:54:00:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["qemu-args", "--socket", "x", "--mac", "zz"], "not a MAC address"),
        (["qemu-args", "--socket", "x", "--queues", "0"], "--queues 0"),
        (["hub"], "at least one --socket"),
        (["hub", "--socket", "/nonexistent/dir/a.sock"], "does not exist"),
        (["hub", "--socket", "/tmp/a.sock", "--socket", "/tmp/a.sock"], "twice"),
        (["hub", "--socket", "/tmp/a.sock", "--log-level", "loud"], "invalid choice"),
        (["status", "--control", "/nonexistent.ctl"], "cannot reach"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--dhcp-range",
          "10.77.0.9"], "want FIRST-LAST"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--dhcp-range",
          "10.77.0.9-10.77.0.2"], "10.77.0.9 comes after 10.77.0.2"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--dhcp-range",
          "10.77.0.9-10.78.0.2"], "is not a range of hosts of 10.77.0.0/24"),
        (["hub", "--socket", "/tmp/a.sock", "--dhcp-range", "10.77.0.2-10.77.0.9"],
         "--dhcp-range needs --subnet and DHCP"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--no-dhcp",
          "--lease-time", "600"], "--lease-time needs --subnet and DHCP"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--dhcp-reserve",
          "52:54:00:00:00:01"], "want MAC=ADDRESS"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--dhcp-reserve",
          "52:54:00:00:00:01=10.77.0.10", "--dhcp-reserve", "52:54:00:00:00:01=10.77.0.11"],
         "a MAC is reserved twice"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--dhcp-reserve",
          "52:54:00:00:00:01=10.78.0.10", "--state-dir", "/tmp"], "not a client address of"),
        (["hub", "--socket", "/tmp/a.sock", "--subnet", "10.77.0.0/24", "--lease-time", "5",
          "--state-dir", "/tmp"], "--lease-time 5: want 60 to"),
        (["vm", "--socket", "/tmp/a.sock", "--hub", "h:1", "--identity", "/nonexistent",
          "--hub-fingerprint", "SHA256:" + "A" * 43, "--name", "bad name"],
         "--name 'bad name': want 1-64 characters"),
    ],
)
def test_bad_flags_get_a_clear_error(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr


def test_status_rendering_names_links_drops_and_broken_devices():
    text = format_status({
        "role": "hub", "pid": 7,
        "ports": [
            {"name": "vm1.sock", "link_up": True, "features": "0x1", "in_frames": 3,
             "in_bytes": 300, "out_frames": 2, "out_bytes": 200, "drops": {"queue_full": 4},
             "guest_drops": {"tx_gso_size_zero": 1}, "broken": None},
            {"name": "vm2.sock", "link_up": False, "in_frames": 0, "in_bytes": 0,
             "out_frames": 0, "out_bytes": 0, "drops": {}, "broken": "queue 1: loops"},
        ],
        "macs": [{"mac": "52:54:00:00:00:01", "port": "vm1.sock", "age": 1.5}],
    } | {"ports": [
        {"name": "vm1.sock", "link_up": True, "features": "0x1", "in_frames": 3,
         "in_bytes": 300, "out_frames": 2, "out_bytes": 200, "drops": {"queue_full": 4},
         "guest_drops": {"tx_gso_size_zero": 1}, "broken": None, "software_offloads": 5},
        {"name": "vm2.sock", "link_up": False, "in_frames": 0, "in_bytes": 0,
         "out_frames": 0, "out_bytes": 0, "drops": {}, "broken": "queue 1: loops"},
        {"name": "gateway", "kind": "gateway", "in_frames": 1, "in_bytes": 60,
         "out_frames": 1, "out_bytes": 60, "drops": {}, "services": {"arp_reply": 1},
         "dhcp": {"ack": 2}},
    ]})
    assert "vm1.sock: link up" in text and "queue_full=4" in text
    assert "tx_gso_size_zero=1" in text
    assert "vm2.sock: link down BROKEN: queue 1: loops" in text
    assert "52:54:00:00:00:01 -> vm1.sock" in text
    assert "5 offloaded in software" in text
    assert "answered: arp_reply=1, dhcp_ack=2" in text


def test_status_rendering_of_an_endpoint_and_a_session():
    text = format_status({
        "role": "endpoint", "pid": 9, "hub": "hub.example:7777", "fingerprint": "SHA256:k",
        "session": {"state": "up", "rtt_ms": 0.42, "reconnects": 2, "last_error": None},
        "ports": [{"name": "hub", "kind": "session", "state": "up", "peer": "hub:7777",
                   "rtt_ms": 0.42, "in_frames": 1, "in_bytes": 2, "out_frames": 3,
                   "out_bytes": 4, "drops": {"link_down": 5}}],
    })
    assert text.startswith("endpoint (pid 9), key SHA256:k\n")
    assert "session to hub.example:7777: up, rtt 0.42 ms, 2 reconnects" in text
    assert "hub: session up from hub:7777, rtt 0.42 ms" in text and "link_down=5" in text


def test_config_file_values_are_defaults_the_command_line_overrides(tmp_path):
    from tunnel.cli.main import parse_args

    config = tmp_path / "vm.toml"
    config.write_text('hub = "127.0.0.1:7777"\nsocket = ["/run/a.sock", "/run/b.sock"]\n'
                      'name = "alice"\nqueues = 2\n')
    args = parse_args(["vm", "--config", str(config), "--name", "bob"])
    assert args.hub == ("127.0.0.1", 7777)
    assert args.socket == ["/run/a.sock", "/run/b.sock"]
    assert args.name == "bob" and args.queues == 2


def test_config_file_with_an_unknown_setting_is_refused(tmp_path):
    config = tmp_path / "vm.toml"
    config.write_text('hubb = "x:1"\n')
    result = run_cli("vm", "--config", str(config))
    assert result.returncode == 2 and "unknown setting 'hubb'" in result.stderr


@pytest.mark.parametrize(("flags", "config_text", "port_policy"), [
    ([], "", True),
    (["--no-port-policy"], "", False),
    ([], "no-port-policy = true\n", False),
])
def test_vm_no_port_policy_reaches_the_endpoint_config(tmp_path, monkeypatch, flags,
                                                       config_text, port_policy):
    import tunnel.cli.roles

    configs = []
    monkeypatch.setattr(tunnel.cli.roles, "_run_endpoint",
                        lambda config, command, metrics, nice: configs.append(config) or 0)
    config = tmp_path / "vm.toml"
    config.write_text(config_text)
    fingerprint = "SHA256:" + "A" * 43
    assert main(["vm", "--socket", str(tmp_path / "a.sock"), "--hub", "127.0.0.1:7777",
                 "--identity", str(tmp_path / "id"), "--hub-fingerprint", fingerprint,
                 "--config", str(config), *flags]) == 0
    assert configs[0].port_policy is port_policy
