"""tunnel: the wire between hub and endpoints (the record codec, TLS, links, admission), the
hub and endpoint roles, and the rooms around them: cli/, lab/ and host/ (TUN/TAP host mode)."""
