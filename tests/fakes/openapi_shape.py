"""Check JSON values against PayNow's OpenAPI schemas (the subset the fakes serve).

The PayNow specs live beside the repository, not in it, so the schemas the
fakes are checked against are vendored in `tests/fakes/openapi/` as subsets:
the paths and webhooks perksync uses and every component schema they reach,
unchanged. Regenerate them from the originals with

    python -m tests.fakes.openapi_shape PATH/TO/paynow-openapi

`shape_errors` walks a schema as OpenAPI 3.1 means it, for what PayNow's specs
use: `$ref`, `allOf`, `oneOf`, `enum`, `type` (a name or a list), `required`,
`properties`, `additionalProperties` (false, or a schema for the values),
`items`, `minimum`/`maximum` and the formats `date-time`, `flake-id`,
`steam-id` and `int32`.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from tests.fakes.paynow_store import DELIVERY_EVENTS

SUBSET_DIR: Final = Path(__file__).with_name("openapi")
# What the fakes serve, by spec file: paths (GET) and webhooks.
SUBSETS: Final = {
    "management-api.yaml": {
        "paths": (
            "/v1/stores/{storeId}/delivery/items",
            "/v1/stores/{storeId}/customers/{customerId}/delivery/items",
        ),
        "webhooks": (),
    },
    "webhook-definitions.yaml": {
        "paths": (),
        "webhooks": (*DELIVERY_EVENTS, "ON_ORDER_COMPLETED"),
    },
}
_HEADER: Final = (
    "# A subset of PayNow's {name}: the {what} the perksync test fakes serve and every\n"
    "# component schema they reach, unchanged. Regenerate with\n"
    "#   python -m tests.fakes.openapi_shape PATH/TO/paynow-openapi\n"
)
_DATE_TIME: Final = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$", re.ASCII
)
_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DIGITS: Final = re.compile(r"^[0-9]{1,20}$", re.ASCII)
_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "null": (type(None),),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@functools.cache
def load(name: str) -> dict[str, Any]:
    """A vendored subset by its spec's file name (e.g. "management-api.yaml")."""
    return read_spec(SUBSET_DIR / name)


def read_spec(path: Path) -> dict[str, Any]:
    with path.open() as file:
        document: dict[str, Any] = yaml.load(file, Loader=_LOADER)
    return document


def response_schema(
    document: Mapping[str, Any], path: str, status: str = "200", method: str = "get"
) -> dict[str, Any]:
    """The JSON schema of one response of a path (`status` "default": the error)."""
    response = document["paths"][path][method]["responses"][status]
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def webhook_schema(document: Mapping[str, Any], event_type: str) -> dict[str, Any]:
    """The JSON schema of a webhook's request body."""
    body = document["webhooks"][event_type]["post"]["requestBody"]
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return schema


def shape_errors(
    document: Mapping[str, Any],
    schema: Mapping[str, Any],
    value: Any,
    *,
    null_optional: bool = False,
    nullable: Collection[str] = (),
) -> list[str]:
    """Every way `value` breaks `schema`, as "where: what" lines ([] when none).

    `null_optional`: a property that is not required may be null even where its
    schema does not say so. `nullable`: property names that may be null anyway.
    """
    checker = _Checker(document, null_optional, frozenset(nullable))
    return list(checker.check(schema, value, "$"))


class _Checker:
    def __init__(
        self, document: Mapping[str, Any], null_optional: bool, nullable: frozenset[str]
    ) -> None:
        self.document = document
        self.null_optional = null_optional
        self.nullable = nullable

    def resolve(self, ref: str) -> Mapping[str, Any]:
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are supported: {ref}")
        node: Any = self.document
        for part in ref[2:].split("/"):
            node = node[part]
        resolved: Mapping[str, Any] = node
        return resolved

    def check(self, schema: Mapping[str, Any], value: Any, where: str) -> Iterator[str]:
        if "$ref" in schema:
            yield from self.check(self.resolve(schema["$ref"]), value, where)
        for part in schema.get("allOf", ()):
            yield from self.check(part, value, where)
        if "oneOf" in schema:
            matches = sum(not any(self.check(part, value, where)) for part in schema["oneOf"])
            if matches != 1:
                yield f"{where}: matches {matches} of the {len(schema['oneOf'])} oneOf schemas"
        if "enum" in schema and value not in schema["enum"]:
            yield f"{where}: {value!r} is not one of {schema['enum']}"
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, name) for name in names):
                yield f"{where}: {type(value).__name__} {value!r:.60} is not {'/'.join(names)}"
                return
        yield from self.check_format(schema, value, where)
        if isinstance(value, dict):
            yield from self.check_object(schema, value, where)
        elif isinstance(value, list) and "items" in schema:
            for n, element in enumerate(value):
                yield from self.check(schema["items"], element, f"{where}[{n}]")

    def check_format(self, schema: Mapping[str, Any], value: Any, where: str) -> Iterator[str]:
        form = schema.get("format")
        if isinstance(value, str) and form == "date-time" and not _DATE_TIME.match(value):
            yield f"{where}: {value!r} is not an ISO 8601 date-time"
        if isinstance(value, str) and form in ("flake-id", "steam-id") and not _DIGITS.match(value):
            yield f"{where}: {value!r} is not a {form}"
        if isinstance(value, int) and not isinstance(value, bool):
            low = schema.get("minimum", -(2**31) if form == "int32" else None)
            high = schema.get("maximum", 2**31 - 1 if form == "int32" else None)
            if (low is not None and value < low) or (high is not None and value > high):
                yield f"{where}: {value} is out of range [{low}, {high}]"

    def check_object(
        self, schema: Mapping[str, Any], value: dict[str, Any], where: str
    ) -> Iterator[str]:
        properties: Mapping[str, Any] = schema.get("properties", {})
        required = schema.get("required", ())
        for name in required:
            if name not in value:
                yield f"{where}: required {name!r} is missing"
        extra = schema.get("additionalProperties", True)
        for name, field_value in value.items():
            here = f"{where}.{name}"
            if name in properties:
                if field_value is None and (
                    name in self.nullable or (self.null_optional and name not in required)
                ):
                    continue
                yield from self.check(properties[name], field_value, here)
            elif extra is False:
                yield f"{here}: not declared (additionalProperties: false)"
            elif isinstance(extra, Mapping):
                yield from self.check(extra, field_value, here)


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


# ------------------------------------------------------------------- subsets


def subset(
    document: Mapping[str, Any], paths: Collection[str], webhooks: Collection[str]
) -> dict[str, Any]:
    """The GET operations of `paths`, the `webhooks`, and every schema they reach."""
    chosen: dict[str, Any] = {}
    if paths:
        chosen["paths"] = {path: {"get": document["paths"][path]["get"]} for path in paths}
    if webhooks:
        chosen["webhooks"] = {name: document["webhooks"][name] for name in webhooks}
    schemas: dict[str, Any] = document["components"]["schemas"]
    names: set[str] = set()
    pending = list(_refs(chosen))
    while pending:
        name = pending.pop()
        if name not in names:
            names.add(name)
            pending.extend(_refs(schemas[name]))
    chosen["components"] = {"schemas": {name: schemas[name] for name in sorted(names)}}
    return chosen


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def originals_dir(start: Path | None = None) -> Path | None:
    """PayNow's full specs, in `shared/reference/paynow-openapi` beside the
    repository or one of its parent folders; None when there are none."""
    here = (start or Path(__file__)).resolve()
    for folder in here.parents:
        candidate = folder / "shared" / "reference" / "paynow-openapi"
        if (candidate / "management-api.yaml").is_file():
            return candidate
    return None


def write_subsets(source: Path) -> list[Path]:
    written = []
    for name, chosen in SUBSETS.items():
        part = subset(read_spec(source / name), chosen["paths"], chosen["webhooks"])
        what = "paths" if chosen["paths"] else "webhooks"
        target = SUBSET_DIR / name
        text = yaml.safe_dump(part, sort_keys=False, allow_unicode=True, width=100)
        target.write_text(_HEADER.format(name=name, what=what) + text)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the vendored OpenAPI subsets.")
    parser.add_argument("source", type=Path, help="the folder holding PayNow's full specs")
    args = parser.parse_args(argv)
    SUBSET_DIR.mkdir(exist_ok=True)
    for path in write_subsets(args.source):
        print(path)


if __name__ == "__main__":
    main()
