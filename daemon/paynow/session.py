"""The process's HTTP session for PayNow, and the check of `paynow.api_url`."""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from daemon import __version__

USER_AGENT: Final = f"perksync/{__version__}"


def validate_api_url(url: str) -> str:
    """Check `paynow.api_url`; return it without a trailing slash.

    It must be https://, except that http:// is allowed for a loopback host
    (127.0.0.0/8, ::1, localhost), e.g. a local fake or a proxy on the box.
    It is the API's root: no path (a proxy must serve the API at its root).
    Raises ValueError with a one-line reason.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("api_url is empty")
    if url != url.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError("api_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"api_url is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ValueError(f"api_url must start with https:// (got {scheme or 'no'} scheme)")
    if not host:
        raise ValueError("api_url has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("api_url must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError("api_url must not contain a query or fragment")
    if parts.path not in ("", "/"):
        # perksync appends /v1/store/...: `https://api.paynow.gg/v1` would ask
        # for /v1/v1/store/customer. One rule, no guessing which prefix is meant.
        raise ValueError(
            f"api_url must be the API's root, without a path (got {parts.path}): "
            f"write {scheme}://{parts.netloc}; perksync adds /v1/store/... itself"
        )
    if scheme == "http" and not _is_loopback(host):
        raise ValueError(
            f"api_url must use https:// unless the host is loopback (got http://{host})"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_session(
    *,
    limit: int = 100,
    limit_per_host: int = 0,
    ttl_dns_cache: int = 300,
    keepalive_timeout: float = 30.0,
) -> aiohttp.ClientSession:
    """The one aiohttp session of the process. Call it from a coroutine and
    close it (`await session.close()`) on shutdown.

    Keep the number of concurrent PayNow requests at or below `limit`: the
    per-request timeout also counts the wait for a free connection.
    """
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=limit_per_host,
        ttl_dns_cache=ttl_dns_cache,
        keepalive_timeout=keepalive_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),  # set per attempt by the transport
        raise_for_status=False,
        trust_env=False,
    )
