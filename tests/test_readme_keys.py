"""The README's table of keys ("Every key") names every key config.yaml takes,
and no key that does not exist.

The keys are walked from the settings models themselves: a section's fields,
`[]` for a list's entries, `<*>` for a mapping's names (servers, products).
In the table, `<name>`, `<slug>` or any `<…>` stands for one key of any name,
and `a.b`, `c` are siblings (`a.b` and `a.c`).
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from daemon.config import Settings
from tests.fakes.world import REPO

ANY = "<*>"


def model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every key path under `model`, containers included: whether a plain value
    (a string, number, list of strings …) can be written for it."""
    keys = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        keys[path] = takes_a_value(field.annotation)
        keys.update(annotation_keys(field.annotation, path))
    return keys


def annotation_keys(annotation: Any, path: str) -> dict[str, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_keys(annotation, path)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return {k: v for arg in args for k, v in annotation_keys(arg, path).items()}
    if origin is list:
        return annotation_keys(args[0], f"{path}[]")
    if origin is dict:
        entry = f"{path}.{ANY}"
        return {entry: takes_a_value(args[1]), **annotation_keys(args[1], entry)}
    return {}


def takes_a_value(annotation: Any) -> bool:
    if annotation is type(None):
        return False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType, list):
        return any(takes_a_value(arg) for arg in args)
    if origin is dict:
        return takes_a_value(args[1])
    return True


def written(keys: dict[str, bool]) -> set[str]:
    """The keys a value is written for (the table must explain each)."""
    return {key for key, plain in keys.items() if plain}


def table_keys(readme: str) -> list[str]:
    """The first column of the table under "### Every key", siblings spelled out."""
    section = readme[readme.index("### Every key") :]
    section = section[: section.index("\n## ")]
    keys = []
    for row in re.findall(r"^\| (`[^|]*`) \|", section, flags=re.MULTILINE):
        first, *siblings = re.findall(r"`([^`]+)`", row)
        parent = first.rpartition(".")[0]
        keys += [first, *(f"{parent}.{sibling}" for sibling in siblings)]
    return keys


def matches(pattern: str, key: str) -> bool:
    """`pattern` (a table key, `<…>` standing for any one name) names `key`."""
    wanted = re.escape(re.sub(r"<[^>]+>", "\0", pattern)).replace("\0", r"[^.\[]+")
    return re.fullmatch(wanted, key.replace(ANY, "x")) is not None


def test_the_walk_finds_the_keys_of_every_kind() -> None:
    keys = model_keys(Settings)
    assert "paynow.api_key_file" in keys
    assert "customers[].token_file" in keys
    assert f"servers.{ANY}.password_file" in keys
    assert f"products.{ANY}.on_active[].per_item" in keys
    assert f"products.{ANY}.on_active" in written(keys)  # a list of strings, or of mappings
    assert "paynow" not in written(keys)
    assert f"servers.{ANY}" not in written(keys)
    assert matches("products.<slug>.<event>[].run", f"products.{ANY}.on_revoke[].run")
    assert not matches("servers.<name>.host", f"servers.{ANY}.port")


def test_every_key_of_the_config_is_in_the_readme_table() -> None:
    table = table_keys((REPO / "README.md").read_text(encoding="utf-8"))
    missing = sorted(
        k for k in written(model_keys(Settings)) if not any(matches(t, k) for t in table)
    )
    assert missing == [], "keys config.yaml takes that the README's table lacks"


def test_every_key_in_the_readme_table_exists() -> None:
    table = table_keys((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(table) > 40
    keys = model_keys(Settings)
    unknown = [t for t in table if not any(matches(t, k) for k in keys)]
    assert unknown == [], "keys in the README's table that config.yaml does not take"
