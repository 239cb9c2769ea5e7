"""`python -m tunnel.cli ARGS`: the `vhostvpn` command, run with this interpreter (the tests,
the lab and the demo start their daemons this way)."""

import sys

from tunnel.cli.main import main

sys.exit(main())
