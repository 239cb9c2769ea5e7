# vhostvpn: the two commands a fresh machine needs are `make demo` and `make test`.
# Everything they need is installed here (as root): Debian packages, a virtualenv with the
# project, and the guest image (Debian cloud kernel + busybox initramfs) built under qemu/build.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qemu-system-x86 iperf3 dpdk-dev cpio gzip xz-utils zstd \
                iproute2 iputils-ping ethtool procps python3-venv gcc tshark \
                libvirt-daemon-system
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint bench fuzz image setup apt clean

demo: setup image
	$(PY) qemu/demo.py

test: setup image
	$(VENV)/bin/pytest -q

test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup image
	$(PY) bench/vhost_switch.py

# The fuzzers' long run (the test run gives each a few seconds): rings and vhost-user
# messages, hostile frames, wire records after authentication, DHCP option soups, and the
# packet views, the DHCP codec and the L3 host and DHCP client fed garbage.  Each of its 20
# tests stops at FUZZ_EXAMPLES examples or after FUZZ_SECONDS (overrunning by at most a
# tenth), so the whole run takes about 10 minutes; e.g. `make fuzz FUZZ_SECONDS=600` for
# a night.
FUZZ_EXAMPLES ?= 100000
FUZZ_SECONDS ?= 25
fuzz: setup
	VHOSTVPN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) VHOSTVPN_FUZZ_SECONDS=$(FUZZ_SECONDS) \
	  $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz_virtio.py \
	  tests/test_hostile_frames.py tests/test_tunnel_fuzz.py \
	  tests/test_dhcp.py::test_option_soups_and_truncated_bootp_are_only_ever_ignored_and_counted \
	  tests/test_wire_views.py tests/test_wire_dhcp.py tests/test_l3host.py \
	  tests/test_dhcp_client.py -k "arbitrary or garbage or soups or fuzz or hostile or tunnel_fuzz"

image: setup
	$(PY) qemu/build_image.py

setup: apt $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml setup.py virtio/_fence.c virtio/_ring.c
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) qemu/build build *.egg-info virtio/*.so
