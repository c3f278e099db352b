"""How log lines look on standard error: for a terminal, or for journald.

Under systemd, standard error is a stream to journald, which adds its own
timestamps and reads a `<N>` prefix on each line as that line's syslog
priority (sd-daemon(3)), so that `journalctl -p err` finds errors. systemd
names that stream in $JOURNAL_STREAM (`device:inode`); a process that only
inherited the variable (a shell started from a service, say) writes elsewhere,
so the stream itself is compared, as sd_journal_stream_fd(3) users do.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# syslog priorities (sd-daemon(3)): 2 crit, 3 err, 4 warning, 6 info, 7 debug.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def writes_to_journal(stream: TextIO | None = None) -> bool:
    """True when `stream` (standard error by default) is the journald stream
    that $JOURNAL_STREAM names."""
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def priority_prefix(levelno: int) -> str:
    """`<N>` for a line written straight to standard error, when that is journald."""
    return f"<{syslog_priority(levelno)}>" if writes_to_journal() else ""


class JournalFormatter(logging.Formatter):
    """Every line of a record carries the record's priority: journald takes each
    line of a traceback as an entry of its own."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def formatter() -> logging.Formatter:
    fmt = "%(levelname)s %(name)s: %(message)s"
    if writes_to_journal():
        return JournalFormatter(fmt)  # journald adds the timestamps
    return logging.Formatter("%(asctime)s " + fmt)


__all__ = ["JournalFormatter", "formatter", "priority_prefix", "syslog_priority"]
