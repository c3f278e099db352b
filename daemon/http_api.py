"""The optional HTTP listener of the service (`http.listen`): /healthz, /metrics
and, in store mode with a webhook secret, PayNow's webhooks.

- `GET /healthz`: `200 ok`, or `503` with one line naming why the service is
  unhealthy (see daemon/metrics.py for the rules). For load balancers, probes
  and humans with curl.
- `GET /metrics`: Prometheus text exposition of the service's own registry.
- `POST /paynow/webhook`: see daemon/sources/webhooks.py (401 unless signed
  by PayNow). Only this path is meant to be forwarded from the internet.
- Anything else: 404 (405 for another method on these paths).

Nothing here ever shows a secret: the health reasons and metric labels are made
of customer labels, server names, error kinds and delivery-failure reasons,
none of which holds a token or a password. The listener is meant for loopback
(`127.0.0.1:9108`); another address is allowed (a VPN interface, say) with a
warning, since there is no authentication.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.metrics import PrometheusTelemetry
from daemon.sources.webhooks import WebhookReceiver

log = logging.getLogger("perksync.http")

# On SIGTERM an open scrape gets this long before the listener closes it.
SHUTDOWN_TIMEOUT_SECONDS = 1.0


class ListenError(Exception):
    """`http.listen` cannot be listened on; the message is one line naming it."""


# What to do about the usual reasons a listener cannot bind.
_BIND_ADVICE = {
    errno.EADDRINUSE: "something else listens there: stop it, or choose another port",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "ports below 1024 need privileges: choose a higher port",
}


def listen_error(listen: str, error: OSError) -> ListenError:
    """The one-line error for `error` raised while binding `listen`."""
    if isinstance(error, socket.gaierror):
        why = f"cannot resolve the host ({error.strerror})"
    elif error.errno is not None:
        why = os.strerror(error.errno).lower()
        if error.errno in _BIND_ADVICE:
            why += f"; {_BIND_ADVICE[error.errno]}"
    else:
        why = str(error)
    return ListenError(f"http.listen {listen}: cannot listen there: {why}")


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9108', '[::1]:9108', 'localhost:9108' → (host, port). Port 0 = any free one."""
    host, sep, port = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"http.listen: {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9108)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: whatever it resolves to


WEBHOOK_PATH = "/paynow/webhook"
WEBHOOK_MAX_BYTES = 1 << 20  # PayNow's webhook bodies are a few kilobytes


def make_app(
    telemetry: PrometheusTelemetry, webhooks: WebhookReceiver | None = None
) -> web.Application:
    """The aiohttp application (no listener): /healthz and /metrics of
    `telemetry`, and the webhook path when `webhooks` is given."""
    scrape_lock = asyncio.Lock()

    async def healthz(request: web.Request) -> web.Response:
        healthy, reason = telemetry.health()
        return web.Response(
            status=200 if healthy else 503,
            text=("ok" if healthy else reason) + "\n",
            headers={"Cache-Control": "no-store"},
        )

    async def metrics(request: web.Request) -> web.Response:
        async with scrape_lock:  # one rendering at a time, however many scrapers
            telemetry.refresh()  # loop-side state → gauges, before leaving the loop
            # 10,000 customers take ~0.2 s to render: do it off the event loop.
            body = await asyncio.get_running_loop().run_in_executor(
                None, generate_latest, telemetry.registry
            )
        return web.Response(
            body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
        )

    async def webhook(request: web.Request) -> web.Response:
        assert webhooks is not None
        body = await request.read()
        status = await webhooks.receive(request.headers, body)
        return web.Response(status=status, text="ok\n" if status == 200 else "refused\n")

    app = web.Application(client_max_size=WEBHOOK_MAX_BYTES)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    if webhooks is not None:
        app.router.add_post(WEBHOOK_PATH, webhook)
    return app


async def start_http(
    listen: str, telemetry: PrometheusTelemetry, webhooks: WebhookReceiver | None = None
) -> web.AppRunner:
    """Listen on `listen` (HOST:PORT) and serve until `stop_http(runner)`.

    Raises ValueError for a malformed address and `ListenError` when it cannot
    bind (address in use, not local): the caller decides whether that is fatal.
    """
    host, port = parse_listen(listen)
    if not is_loopback(host):
        log.warning(
            "http.listen %s is not a loopback address: /healthz and /metrics have no "
            "authentication; make sure only trusted networks can reach it",
            listen,
        )
    runner = web.AppRunner(
        make_app(telemetry, webhooks),
        access_log=None,  # a scrape every few seconds is not news for the journal
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException as exc:
        await runner.cleanup()
        if isinstance(exc, OSError):
            raise listen_error(listen, exc) from exc
        raise
    paths = "/healthz, /metrics" + (f" and {WEBHOOK_PATH}" if webhooks is not None else "")
    log.info("serving %s on %s", paths, ", ".join(_shown(a) for a in runner.addresses))
    return runner


def bound_addresses(runner: web.AppRunner) -> list[tuple[str, int]]:
    """(host, port) of every socket the listener is bound to (port 0 → the real port)."""
    return [(str(a[0]), int(a[1])) for a in runner.addresses]


async def stop_http(runner: web.AppRunner) -> None:
    await runner.cleanup()


def _shown(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


__all__ = [
    "ListenError",
    "bound_addresses",
    "is_loopback",
    "listen_error",
    "make_app",
    "parse_listen",
    "start_http",
    "stop_http",
]
