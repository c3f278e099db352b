"""Numbered schema migrations: what a step is, and how a backend registers its own.

Each backend keeps its steps in a list, `MIGRATIONS`, filled in order by the
decorator `registrar(MIGRATIONS)` makes: `MIGRATIONS[n - 1]` takes the schema
from version n - 1 to n. A released step is never edited or reordered; a
change of schema appends a new one. How a step runs (inside one transaction,
where the version is recorded) is the backend's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Upgrade = TypeVar("Upgrade")


@dataclass(frozen=True, slots=True)
class Migration(Generic[Upgrade]):
    version: int  # the schema version after this step
    description: str
    upgrade: Upgrade  # runs inside the step's transaction


def registrar(
    steps: list[Migration[Upgrade]],
) -> Callable[[str], Callable[[Upgrade], Upgrade]]:
    """`@migration("what it does")`: append the decorated function to `steps`
    as the next numbered step."""

    def migration(description: str) -> Callable[[Upgrade], Upgrade]:
        def register(upgrade: Upgrade) -> Upgrade:
            steps.append(Migration(len(steps) + 1, description, upgrade))
            return upgrade

        return register

    return migration
