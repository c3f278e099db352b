"""The stdin/stdout protocol of the fakes in `bench.fakes`: one command line in, one line out."""

from __future__ import annotations

import asyncio
import resource
import sys
from collections.abc import AsyncIterator, Callable


def cpu() -> str:
    """This process's CPU time so far (user + sys), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return repr(usage.ru_utime + usage.ru_stime)


def reply(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def lines() -> AsyncIterator[list[str]]:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:  # the parent went away
            return
        yield line.split()


async def answer_lines(answer: Callable[[list[str]], str]) -> None:
    """Reply to each command line with `answer(words)` until `quit` (or stdin ends)."""
    async for words in lines():
        if words == ["quit"]:
            reply("bye")
            return
        if words:
            reply(answer(words))
