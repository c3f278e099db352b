"""A loopback world for end-to-end runs: the PayNow fake and RCON fakes on a
background event loop, plus a config.yaml pointing at them.

With `store=True` the Management fake (`FakeStore`, store mode) runs beside
the Storefront one: `config()` then writes a store-mode config (its API key
comes from $PAYNOW_API_KEY, which `run_cli` and `start_service` set), or a
token-mode one with `mode="token"` for the customers linked by
`link_by_token`, so one state database can be switched between the modes.

The CLI under test runs as a real subprocess (`python -m daemon`), so the fakes
live in their own thread; tests (and the demo) change the world between passes
with plain method calls.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.fakes.paynow_api import FakePayNow
from tests.fakes.paynow_store import FakeStore
from tests.fakes.rcon_server import FakeRconServer

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

RCON_PASSWORD = "rcon-pw-SECRET"
API_KEY_ENV = "PAYNOW_API_KEY"
WEBHOOK_SECRET_ENV = "PAYNOW_WEBHOOK_SECRET"


class World:
    """PayNow + game servers on loopback. Use as a context manager."""

    def __init__(self, folder: Path, servers: Mapping[str, str], *, store: bool = False) -> None:
        """`servers`: name → platform ("minecraft" or "source"); `store`: run
        the Management fake too (store mode)."""
        self.folder = folder
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.paynow = FakePayNow()
        self.store = FakeStore() if store else None
        self.webhook_secret: str | None = None  # store mode: set by config(webhooks=True)
        self.platforms = dict(servers)
        self.rcon = {
            name: FakeRconServer(
                "minecraft" if platform == "minecraft" else "srcds", password=RCON_PASSWORD
            )
            for name, platform in servers.items()
        }
        self.tokens: list[str] = []

    def __enter__(self) -> World:
        self._thread.start()
        self.call(self.paynow.start())
        if self.store is not None:
            self.call(self.store.start())
        for server in self.rcon.values():
            self.call(server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for server in self.rcon.values():
                self.call(server.stop())
            self.call(self.paynow.stop())
            if self.store is not None:
                self.call(self.store.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the fakes' loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a plain function on the fakes' loop (their data is not thread-safe)."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(10)

    # --- the world's content ---------------------------------------------------

    def add_customer(
        self, *, platform: str = "minecraft", name: str | None = None, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        token = FakePayNow.new_token()
        customer = self.sync(
            self.paynow.add_customer, token, platform=platform, name=name, **kwargs
        )
        self.tokens.append(token)
        return token, customer

    def add_item(self, token: str, product: str, state: str = "active", **kwargs: Any) -> str:
        item = self.sync(self.paynow.add_item, token, None, product=product, state=state, **kwargs)
        return str(item["id"])

    def set_state(self, token: str, item_id: str, state: str, reason: str | None = None) -> None:
        self.sync(self.paynow.set_state, token, item_id, state, reason)

    # --- store mode's content ------------------------------------------------------

    @property
    def management(self) -> FakeStore:
        if self.store is None:
            raise RuntimeError("this world has no store mode: World(..., store=True)")
        return self.store

    def store_customer(self, platform: str = "minecraft", **kwargs: Any) -> dict[str, Any]:
        """A new customer of the store (see `FakeStore.add_customer`)."""
        return self.sync(self.management.add_customer, platform, **kwargs)

    def store_item(self, customer_id: str, product: str = "vip", **kwargs: Any) -> str:
        """A new item of the store (see `FakeStore.add_item`); its id."""
        item = self.sync(self.management.add_item, customer_id, product=product, **kwargs)
        return str(item["id"])

    def link_by_token(self, customer_id: str) -> str:
        """Link a store customer in token mode: its items, as the Storefront
        shows them now, behind a new token (listed in a token-mode config)."""
        token = FakePayNow.new_token()

        def link() -> None:
            store = self.management
            customer = dict(store.customer(customer_id))
            self.paynow.add_customer(token, customer, store.storefront_items(customer_id))

        self.sync(link)
        self.tokens.append(token)
        return token

    def received(self, server: str) -> list[str]:
        return self.sync(lambda: list(self.rcon[server].commands))

    # --- config and CLI ---------------------------------------------------------

    def config(
        self,
        products: Mapping[str, Any],
        *,
        extra: Mapping[str, Any] | None = None,
        servers: Sequence[str] | None = None,
        mode: str | None = None,
        webhooks: bool = False,
    ) -> Path:
        """Write config.yaml for the current customers; return its path.

        `mode`: "token" (the linked tokens) or "store" (the Management fake's
        store; the default when the world has one). `webhooks` (store mode):
        a webhook secret from the environment (`webhook_secret`)."""
        mode = mode or ("store" if self.store is not None else "token")
        secrets = self.folder / "secrets"
        secrets.mkdir(exist_ok=True)
        customers = []
        for index, token in enumerate(self.tokens):
            path = secrets / f"token{index}"
            path.write_text(token + "\n")
            customers.append({"token_file": f"secrets/token{index}"})
        (secrets / "rcon").write_text(RCON_PASSWORD)
        paynow: dict[str, Any] = {"api_url": self.paynow.url, "timeout_seconds": 2}
        if mode == "store":
            paynow = {
                "api_url": self.management.url, "timeout_seconds": 2,
                "store_id": self.management.store_id, "api_key_env": API_KEY_ENV,
            }  # fmt: skip
            if webhooks:
                self.webhook_secret = self.webhook_secret or "whsec-" + FakePayNow.new_token()
                paynow["webhook_secret_env"] = WEBHOOK_SECRET_ENV
        data: dict[str, Any] = {
            "paynow": paynow,
            "sync": {"state_db": "state.sqlite3"},
            "customers": customers,
            "servers": {
                name: {
                    "platform": self.platforms[name],
                    "host": "127.0.0.1",
                    "port": self.rcon[name].port,
                    "password_file": "secrets/rcon",
                    "timeout_seconds": 2,
                }
                for name in (servers if servers is not None else self.rcon)
            },
            "products": dict(products),
        }
        if mode == "store":
            del data["customers"]  # every customer of the store is linked
        for key, value in (extra or {}).items():
            data.setdefault(key, {}).update(value)
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return path

    def cli_command(self, *args: str) -> list[str]:
        """`python -m daemon --config <folder>/config.yaml ARGS`."""
        return [sys.executable, "-m", "daemon", "--config", str(self.folder / "config.yaml"), *args]

    def cli_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment without PERKSYNC_* overrides, plus `env`."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PERKSYNC_")}
        full_env["PYTHONPATH"] = str(REPO)
        if self.store is not None:
            full_env[API_KEY_ENV] = self.store.api_key
        if self.webhook_secret is not None:
            full_env[WEBHOOK_SECRET_ENV] = self.webhook_secret
        full_env.update(env or {})
        return full_env

    def start_service(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start `python -m daemon --config <folder>/config.yaml` (service mode).

        Its log goes to <folder>/service.log (appended, so restarts add to it).
        """
        log = (self.folder / "service.log").open("a")
        return subprocess.Popen(
            self.cli_command(*args),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.cli_env(env),
            cwd=self.folder,
        )

    def service_log(self) -> str:
        path = self.folder / "service.log"
        return path.read_text() if path.exists() else ""

    def run_cli(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -m daemon --config <folder>/config.yaml ARGS` and wait."""
        return subprocess.run(
            self.cli_command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.cli_env(env),
            cwd=self.folder,
            check=False,
        )
