"""Where the tests find PostgreSQL, and an empty schema of it for each test.

The server is `PERKSYNC_TEST_POSTGRES_URL`, by default the development and CI
machines' own (`postgresql://postgres@127.0.0.1:5432/test`, trusting local
connections). Each test gets a schema of its own, created empty and dropped
after it: the store's URL names it in `search_path` (and turns off
`synchronous_commit`: a test never outlives a crash of the server, and the
flushes would double its time). Where no server answers,
the tests that need one are skipped with a one-line reason; with
`PERKSYNC_REQUIRE_POSTGRES=1` (CI) they fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from daemon.state import describe_postgres_url

URL_VARIABLE = "PERKSYNC_TEST_POSTGRES_URL"
REQUIRE_VARIABLE = "PERKSYNC_REQUIRE_POSTGRES"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL


def with_settings(url: str, **settings: str) -> str:
    """`url` with server settings added to its query (e.g. search_path)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), *settings.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _execute(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@functools.cache
def _unreachable(url: str) -> str | None:
    """Why no test can use the server at `url` (None: it answers)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[test]')"
    try:
        asyncio.run(_execute(url, "SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def require_server() -> str:
    """The server's URL; skips the test (fails it under CI) when none answers."""
    url = server_url()
    problem = _unreachable(url)
    if problem is not None:
        line = f"PostgreSQL at {describe_postgres_url(url)} is not reachable ({problem}); set {URL_VARIABLE}"
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(line, pytrace=False)
        pytest.skip(line)
    return url


@contextlib.contextmanager
def empty_schema(*, durable: bool = False) -> Iterator[str]:
    """A store URL naming a new, empty schema of the test database; dropped
    after. `durable`: commits wait for the disk, as in production."""
    url = require_server()
    schema = f"perksync_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_execute(url, f"CREATE SCHEMA {schema}"))
    settings = (
        {"search_path": schema} if durable else {"search_path": schema, "synchronous_commit": "off"}
    )
    try:
        yield with_settings(url, **settings)
    finally:
        asyncio.run(_execute(url, f"DROP SCHEMA {schema} CASCADE"))
