"""The command line's commands (`perksync COMMAND`): their options, and the
dispatch of the operator commands to their modules.

`status` and `journal` only read; `resend`, `adopt`, `cancel` and `retry`
change the state through customer blocks. None of them takes the state
lock: they work beside a running service (see daemon/operator.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any, Final

from daemon.adopt import adopt
from daemon.clock import SYSTEM_CLOCK
from daemon.config import Settings
from daemon.journal_view import DEFAULT_LIMIT, show_journal
from daemon.operator import UsageProblem, open_existing, open_state, state_copy
from daemon.resend import check_request, resend
from daemon.row_commands import Outcome, cancel, named_rows, retry
from daemon.state import JournalStatus

log = logging.getLogger(__name__)

OPERATOR_COMMANDS: Final = frozenset({"journal", "resend", "adopt", "cancel", "retry"})
# They check the state folder first.
WRITING_COMMANDS: Final = frozenset({"resend", "adopt", "cancel", "retry"})
DRY_RUN_COMMANDS: Final = frozenset({"resend", "adopt"})
EXIT_OK, EXIT_NOT_ALL_DONE = 0, 3


def _count(text: str) -> int:
    """A whole number >= 0 (argparse names the option in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _row_id(text: str) -> int:
    """A journal row's id, as `perksync journal` shows it (`#12` or `12`)."""
    try:
        value = int(text.removeprefix("#"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a journal row id: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a journal row id: {text!r}")
    return value


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """The commands, on the top parser's subparsers; `common`: --config and -v."""
    commands.add_parser(
        "status",
        parents=[common],
        help="linked customers, commands per server, live items that reach no server",
    )
    journal = commands.add_parser(
        "journal", parents=[common], help="the delivery journal, newest first"
    )
    journal.add_argument("--server", metavar="S", help="only this server's rows")
    journal.add_argument("--customer", metavar="ID", help="only this PayNow customer's rows")
    journal.add_argument(
        "--status",
        action="append",
        choices=[str(s) for s in JournalStatus],
        help="only rows in this status (may be given more than once)",
    )
    journal.add_argument(
        "--limit",
        metavar="N",
        type=_count,
        default=DEFAULT_LIMIT,
        help=f"at most N rows (default {DEFAULT_LIMIT}; 0: all)",
    )
    journal.add_argument("--json", action="store_true", help="one JSON array of objects")
    _add_resend(commands, common)
    adopt = commands.add_parser(
        "adopt",
        parents=[common],
        help="record every live item as granted, sending nothing (taking over a store)",
    )
    _dry_run(adopt, "say what would be recorded; change nothing")
    cancel = commands.add_parser(
        "cancel", parents=[common], help="mark pending or waiting journal rows cancelled"
    )
    cancel.add_argument("rows", metavar="ROW", nargs="+", type=_row_id, help="journal row id")
    retry = commands.add_parser(
        "retry", parents=[common], help="journal failed or rejected rows again"
    )
    retry.add_argument("rows", metavar="ROW", nargs="*", type=_row_id, help="journal row id")
    retry.add_argument(
        "--rejected", action="store_true", help="every rejected row (not yet journaled again)"
    )
    retry.add_argument("--server", metavar="S", help="with --rejected: only this server's")


def _dry_run(command: argparse.ArgumentParser, help: str) -> None:
    # Unset unless given: `perksync --dry-run resend` means the same.
    command.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help=help)


def _add_resend(commands: Any, common: argparse.ArgumentParser) -> None:
    resend = commands.add_parser(
        "resend",
        parents=[common],
        help="journal on_active again for what is granted on a server (after a wipe)",
    )
    resend.add_argument("--server", metavar="S", required=True, help="the server to resend to")
    resend.add_argument("--customer", metavar="ID", help="only this PayNow customer's items")
    resend.add_argument("--product", metavar="SLUG", help="only this product's items")
    _dry_run(resend, "print the commands as `server: command` lines; change nothing")


async def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run an operator command; its exit status."""
    if args.command == "journal":
        return await show_journal(
            settings,
            server=args.server,
            customer_id=args.customer,
            statuses=[JournalStatus(s) for s in args.status or ()],
            limit=args.limit or None,
            as_json=args.json,
        )
    if args.command == "resend":
        return await _resend(args, settings)
    if args.command == "adopt":
        return await _adopt(settings, dry_run=args.dry_run)
    if args.command == "retry" and bool(args.rows) == args.rejected:
        raise UsageProblem("retry takes journal row ids, or --rejected (not both)")
    if args.command == "retry" and args.server is not None and not args.rejected:
        raise UsageProblem("retry --server goes with --rejected")
    if args.command in ("cancel", "retry"):
        return await _row_command(args, settings)
    raise AssertionError(f"not an operator command: {args.command}")


async def _adopt(settings: Settings, *, dry_run: bool) -> int:
    prefix = "would record: " if dry_run else "recorded: "

    def output(line: str) -> None:
        print(prefix + line, flush=True)

    # A dry run reads and writes a throw-away copy of the state.
    with state_copy(settings) if dry_run else contextlib.nullcontext(open_state(settings)) as store:
        try:
            adopted, failed = await adopt(settings, store, clock=SYSTEM_CLOCK, output=output)
        finally:
            await store.close()
    done = (
        f"{adopted.items} live items of {adopted.customers} customers as granted "
        f"({adopted.marks} item and server pairs)"
    )
    if dry_run:
        log.info("dry run: adopt would record %s; nothing changed", done)
    else:
        log.info("adopt: recorded %s; nothing was sent", done)
    if failed:
        log.error("adopt: %d customers or reads failed (see above); run adopt again", failed)
        return EXIT_NOT_ALL_DONE
    return EXIT_OK


async def _row_command(args: argparse.Namespace, settings: Settings) -> int:
    store = open_existing(settings)
    if store is None:
        if args.rows:
            raise UsageProblem(f"{args.command}: no journal row (no pass has run yet)")
        return EXIT_OK
    try:
        if args.command == "cancel":
            outcome = await cancel(store, args.rows, now=SYSTEM_CLOCK.now)
        elif args.rejected:
            rows = await store.journal(
                server=args.server, statuses=[JournalStatus.REJECTED], limit=None
            )
            outcome = await retry(
                settings, store, rows[::-1], now=SYSTEM_CLOCK.now, skip_retried=True
            )
            if not outcome.lines:
                print("no rejected rows to retry")
        else:
            rows = await named_rows(store, args.rows, "retry")
            outcome = await retry(settings, store, rows, now=SYSTEM_CLOCK.now)
    finally:
        await store.close()
    return _finish(outcome)


def _finish(outcome: Outcome) -> int:
    for line in outcome.lines:
        print(line)
    return EXIT_NOT_ALL_DONE if outcome.left else EXIT_OK


async def _resend(args: argparse.Namespace, settings: Settings) -> int:
    check_request(settings, args.server, args.product)
    store = open_existing(settings)
    if store is None:
        log.info("resend: nothing is granted on %s (no pass has run yet)", args.server)
        return EXIT_OK
    try:
        report = await resend(
            settings, store, args.server, customer_id=args.customer, product=args.product,
            dry_run=args.dry_run, now=SYSTEM_CLOCK.now,
        )  # fmt: skip
    finally:
        await store.close()
    done = (
        f"{report.journaled} commands for {report.items} items of {report.customers} "
        f"customers on {args.server}"
    )
    if report.skipped:
        done += f" ({report.skipped} items skipped, see above)"
    if args.dry_run:
        log.info("dry run: resend would journal %s; nothing changed", done)
    else:
        log.info(
            "resend: journaled %s; the running service delivers them within seconds, "
            "else the next perksync --sync-now", done,
        )  # fmt: skip
    if report.failed:
        log.error("resend: %d customers failed: %s", len(report.failed), ", ".join(report.failed))
        return EXIT_NOT_ALL_DONE
    return EXIT_OK
