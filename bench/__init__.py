"""perksync benchmarks: poll pass, RCON throughput, growth.

`python -m bench` runs everything on loopback and writes
`bench/results/latest.md` and `bench/results/latest.json`; `python -m bench
--help` lists the parts. Every process that matters runs on its own: the fakes
(PayNow, RCON) in their own processes so their CPU is not counted against the
client, and each measured client (`perksync --sync-now`, the bare aiohttp
floor, the RCON clients) as a child whose wall time, CPU time and peak RSS are
taken from `os.wait4`.
"""
