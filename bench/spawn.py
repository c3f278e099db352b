"""Run one command and write its own resource usage: the measuring middleman.

    python -m bench.spawn RESULT_FILE TIMEOUT ARGV...

Why a middleman: on Linux a child's `ru_maxrss` is at least the peak RSS of
the process it was forked from (the memory map it starts with, which `exec`
folds into the high-water mark), so a child spawned by the benchmark itself,
which holds the expected commands of 50,000 customers, would report the
benchmark's memory rather than its own. This process stays small (only the
standard library), forks the command, waits for it with `os.wait4` and writes
`{"wall_s", "user_s", "sys_s", "peak_rss_mb", "returncode"}` as JSON to
RESULT_FILE. After TIMEOUT seconds it kills the command and writes
`"timed_out": true`. Its own stdin, stdout and stderr are the command's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> int:
    result_file, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the command
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    timed_out = False

    def kill(signum: int, frame: object) -> None:
        nonlocal timed_out
        timed_out = True
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, kill)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    while True:
        try:
            _, status, usage = os.wait4(pid, 0)
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries wait4 itself
            continue
    ended = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, 0)
    result = {
        "wall_s": ended - started,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "returncode": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
    }
    with open(result_file, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
