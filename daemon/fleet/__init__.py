"""Several perksync hosts on one PostgreSQL database.

- `timing`: how long a lease lasts and how often it is renewed, from
  `sync.interval_seconds` (pure; config.py checks it).
- `fingerprint`: the settings every host of one database must share (pure).
- `host`: the service's side: the host's record, its leases renewed on a
  tick, the roles (polling, delivering to a server) they turn on and off.
- `wakeups`: LISTEN/NOTIFY between hosts (new journal rows, webhook hints).
- `one_pass`: the leases a `--sync-now` pass holds.

Nothing here is imported by config.py but `timing` (this file imports nothing).
"""
