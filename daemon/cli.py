"""The `perksync` command line. The only place logging is configured.

Exit status: 0 all done; 2 invalid configuration or command line, or a state
folder, state database or listen address that cannot be used as set up
(nothing was contacted; systemd does not restart); 3 the pass finished but
something is not delivered; 1 anything unexpected, a state database that
cannot be written any more among it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

from daemon import __version__, log_format, startup_signals
from daemon.clock import SYSTEM_CLOCK
from daemon.commands import (
    DRY_RUN_COMMANDS,
    OPERATOR_COMMANDS,
    WRITING_COMMANDS,
    add_commands,
    run_command,
)
from daemon.config import ConfigError, Settings, config_path_from, load_settings
from daemon.fleet.host import FleetRefused
from daemon.fleet.leases import ServerLease
from daemon.http_api import ListenError
from daemon.operator import UsageProblem, open_state, state_copy
from daemon.preflight import setup_problems
from daemon.report import PassReport
from daemon.state import Store, StoreError, StoreWriteError, describe_postgres_url
from daemon.state.lock import LockedError, LockFileError, state_lock
from daemon.state.shared import SharedStore
from daemon.status import print_status
from daemon.sync_pass import run_pass

log = logging.getLogger("perksync")

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_UNDELIVERED = 0, 1, 2, 3


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


# What `--help` ends with; the README's table says the same.
EXIT_STATUS_HELP = """\
exit status:
  0  all done
  1  anything unexpected (the log says what), a state database that cannot be
     written any more included
  2  perksync cannot start as set up (the configuration, the command line, the
     state folder or the listen address); nothing was contacted
  3  the pass finished, but something is not delivered: a customer's inventory
     could not be read, a command is still pending (server down), or a command
     failed or was rejected (an error reply) in this pass (commands waiting for
     their player or their time do not count); for resend, adopt, cancel and
     retry: something asked was not done (a row left as it is, a customer not
     read or changed)
"""


CONFIG_HELP = "config file (default: $PERKSYNC_CONFIG or /etc/perksync/config.yaml)"


def _common_options(*, defaults: bool) -> argparse.ArgumentParser:
    """--config and -v, accepted before and after a command's name. A
    command's copy leaves them unset unless given (argparse would otherwise
    let it overwrite what was given before the command's name)."""
    common = argparse.ArgumentParser(add_help=False)
    unset = argparse.SUPPRESS
    common.add_argument(
        "--config", metavar="PATH", help=CONFIG_HELP, default=None if defaults else unset
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging",
        default=False if defaults else unset,
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="perksync",
        description=(
            "Turn PayNow purchases into in-game perks over RCON, exactly once.\n\n"
            "Plain `perksync` (no --sync-now, --check-config or command) runs the\n"
            "long-lived service, as the systemd unit does; SIGTERM stops it."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(defaults=True)],
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sync-now", action="store_true", help="run one full pass and exit")
    mode.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --sync-now: print the commands a pass would send; change nothing",
    )
    parser.add_argument("--version", action="version", version=f"perksync {__version__}")
    add_commands(
        parser.add_subparsers(dest="command", metavar="COMMAND"), _common_options(defaults=False)
    )
    return parser


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd: no timestamps (journald adds them), a syslog priority per line.
    handler.setFormatter(log_format.formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiohttp's access/debug chatter is not ours to show.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    # APScheduler logs every job run at INFO and every skipped overrun at
    # WARNING: with thousands of customers that would drown the journal (skips
    # are counted in the metrics instead).
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _print_error(line: str) -> None:
    """An error that stops perksync before logging runs (err priority under journald)."""
    print(f"{log_format.priority_prefix(logging.ERROR)}perksync: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command and (args.sync_now or args.check_config):
            raise _UsageError(f"{args.command} takes no other mode flag")
        if args.dry_run and not (args.sync_now or args.command in DRY_RUN_COMMANDS):
            raise _UsageError("--dry-run goes with --sync-now, resend or adopt")
    except _UsageError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    if not (args.command or args.sync_now or args.check_config):
        startup_signals.hold()  # service mode: a stop during start-up must not kill it half-way
    setup_logging(args.verbose)
    path = config_path_from(args.config)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            _print_error(f"config error: {line}")
        return EXIT_USAGE
    try:
        if args.check_config:
            if _report_setup_problems(settings, listen=True):
                return EXIT_USAGE
            linked = (
                f"store mode (store {settings.paynow.store_id})"
                if settings.store_mode
                else f"{len(settings.customers)} customers"
            )
            print(
                f"{path}: OK ({linked}, "
                f"{len(settings.servers)} servers, {len(settings.products)} products)"
            )
            return EXIT_OK
        if args.command == "status":
            return asyncio.run(print_status(settings))
        if args.command in OPERATOR_COMMANDS:
            return _operator_command(args, settings)
        if args.sync_now and args.dry_run:
            return asyncio.run(_sync_now(settings, dry_run=True))
        # (The service's own bind reports a busy http.listen, before any poll.)
        if _report_setup_problems(settings, listen=False):
            return EXIT_USAGE
        with _file_lock(settings):
            if args.sync_now:
                return asyncio.run(_sync_now(settings, dry_run=False))
            return asyncio.run(_serve(path, settings))
    except LockedError as exc:
        log.error("%s", exc)
        return EXIT_UNEXPECTED
    except (LockFileError, ListenError) as exc:
        print(f"perksync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FleetRefused as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except StoreWriteError as exc:
        log.error("%s; stopped: nothing more is polled or sent until it can be written", exc)
        return EXIT_UNEXPECTED
    except StoreError as exc:
        log.error("state store: %s", exc)
        return EXIT_UNEXPECTED
    except KeyboardInterrupt:
        return EXIT_UNEXPECTED
    except Exception:
        log.exception("unexpected error")
        return EXIT_UNEXPECTED


def _operator_command(args: argparse.Namespace, settings: Settings) -> int:
    """journal, resend, adopt, cancel, retry: beside the service, without the
    state lock (see daemon/operator.py)."""
    if args.command in WRITING_COMMANDS and _report_setup_problems(settings, listen=False):
        return EXIT_USAGE
    try:
        return asyncio.run(run_command(args, settings))
    except UsageProblem as exc:
        _print_error(str(exc))
        return EXIT_USAGE


def _report_setup_problems(settings: Settings, *, listen: bool) -> bool:
    """Print what of the machine stops perksync from starting (the state folder,
    with `listen` the service's listen address); True if anything does."""
    problems = setup_problems(settings, listen=listen)
    for line in problems:
        print(f"perksync: {line}", file=sys.stderr)
    return bool(problems)


def _print_line(line: str) -> None:
    print(line, flush=True)


def _file_lock(settings: Settings) -> AbstractContextManager[None]:
    """One delivering perksync per SQLite state: the state-file lock, taken
    before the event loop starts. On PostgreSQL, leases in the database say
    which host delivers where (daemon/fleet/)."""
    if settings.state_db_postgres:
        return contextlib.nullcontext()
    return state_lock(settings.state_db_path)


@contextlib.asynccontextmanager
async def _pass_leases(
    settings: Settings, store: Store
) -> AsyncIterator[Mapping[str, ServerLease] | None]:
    """The leases a pass on a PostgreSQL state holds (see daemon/fleet/one_pass.py);
    with SQLite, none (the state file's lock is taken before the loop starts)."""
    if not settings.state_db_postgres:
        yield None
        return
    from daemon.fleet.one_pass import pass_leases

    database = describe_postgres_url(settings.state_db_url)
    async with pass_leases(settings, cast(SharedStore, store), SYSTEM_CLOCK, database) as held:
        yield held


async def _wake_other_hosts(settings: Settings, store: Store, report: PassReport) -> None:
    """Rows a pass on a PostgreSQL state left for other sites' servers: wake their hosts."""
    if settings.state_db_postgres and report.left_to_others:
        from daemon.fleet.one_pass import wake_other_hosts

        await wake_other_hosts(cast(SharedStore, store), report.left_to_others)


async def _sync_now(settings: Settings, *, dry_run: bool) -> int:
    if dry_run:
        with state_copy(settings) as scratch:
            return await _dry_run(settings, scratch)
    store = open_state(settings)
    try:
        async with _pass_leases(settings, store) as leases:
            report = await run_pass(settings, store, leases=leases)
        await _wake_other_hosts(settings, store, report)
    finally:
        await store.close()
    log.info("%s", report.summary(store_mode=settings.store_mode))
    return report.exit_code


async def _dry_run(settings: Settings, store: Store) -> int:
    """A pass on a scratch copy of the state (`store`), closed after."""
    # The printed lines are the output; "delivered" lines would mislead.
    logging.getLogger("daemon.delivery").setLevel(logging.WARNING)
    try:
        report = await run_pass(settings, store, dry_run_output=_print_line)
    finally:
        await store.close()
    log.info(
        "dry run: %s (nothing was sent or stored)",
        report.summary(dry_run=True, store_mode=settings.store_mode),
    )
    return EXIT_UNDELIVERED if report.customers_failed else EXIT_OK


async def _serve(config_path: Path, settings: Settings) -> int:
    """Service mode (daemon/service.py) until SIGTERM/SIGINT."""
    from daemon.service import Service  # APScheduler and prometheus only here

    store = open_state(settings)
    try:
        return await Service(config_path, settings, store).run()
    finally:
        await store.close()
