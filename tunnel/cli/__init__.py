"""The `vhostvpn` command line (console script `vhostvpn = tunnel.cli.main:main`; also
`python -m tunnel.cli`).

  main.py        the parser, --config, logging and the dispatch to a subcommand
  flags.py       flags and checks several subcommands share
  roles.py       hub, vm, host: their flags, checks and configs
  launch.py      running a role: socket paths, --metrics, Trio, signals, start-up failures
  keys.py        keygen, fingerprint
  status.py      status, and `format_status`: a running process's state as text
  qemu.py        qemu-args: QEMU options or libvirt XML for a guest's NIC
  capture.py     capture: pcapng of one port to stdout
  configfile.py  --config FILE: a TOML file's values as command-line tokens
  completion.py  bash completion generated from the parser
`vhostvpn lab` is tunnel/lab/ (its parser is registered here; the lab never imports this
package).  The roles themselves are tunnel/hub.py and tunnel/endpoint.py.
"""
