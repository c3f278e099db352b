"""config.yaml: the operator's settings, validated once at start-up.

`load_settings(path)` reads the YAML file, lets `PERKSYNC_<SECTION>__<KEY>`
environment variables override single keys (see `_environment_overrides`), checks
every key, resolves every secret and parses every command template, and either
returns a complete `Settings` or raises `ConfigError` whose message names the
offending key path (`products.vip.on_active[0]: …`), or the variable when the
value came from one. Nothing is contacted before this succeeds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Self, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adapters import PLATFORMS
from daemon.fleet.timing import LeaseTiming
from daemon.paynow import validate_api_url
from daemon.placeholders import Template, TemplateError, parse_template
from daemon.state import is_postgres_url, postgres_driver_missing, postgres_url_problem

DEFAULT_CONFIG_PATH = Path("/etc/perksync/config.yaml")
EVENT_KEYS = ("on_active", "on_expire", "on_revoke")
# `products.<slug>: ignore`: a product the store sells that is deliberately not delivered.
IGNORE = "ignore"

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(Exception):
    """The configuration is invalid. The message is one or more lines, each `key.path: what`."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayNowSettings(_Section):
    api_url: str = "https://api.paynow.gg"
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    # One budget for the whole process; PayNow's storefront limits are per IP.
    requests_per_second: Annotated[float, Field(ge=0, le=10_000)] = 20.0
    # Store mode: the store and a Management API key (they go together).
    store_id: Annotated[str, Field(pattern=r"^[0-9]{1,20}$")] | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key: SecretStr | None = None
    # Store mode, optional: the secret PayNow signs webhooks with.
    webhook_secret_env: str | None = None
    webhook_secret_file: str | None = None
    webhook_secret: SecretStr | None = None

    _api_key: SecretStr | None = PrivateAttr(default=None)
    _webhook_secret: SecretStr | None = PrivateAttr(default=None)

    @field_validator("api_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return validate_api_url(value)

    @model_validator(mode="after")
    def _at_most_one_source(self) -> Self:
        _at_most_one(self, "api_key")
        _at_most_one(self, "webhook_secret")
        return self

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_env or self.api_key_file or self.api_key)

    @property
    def has_webhook_secret(self) -> bool:
        return bool(self.webhook_secret_env or self.webhook_secret_file or self.webhook_secret)

    @property
    def api_key_secret(self) -> SecretStr:
        if self._api_key is None:
            raise RuntimeError("the API key is resolved by load_settings")
        return self._api_key

    @property
    def webhook_secret_value(self) -> SecretStr | None:
        """The webhook secret, resolved; None when webhooks are off."""
        return self._webhook_secret


# A site's name, as servers.<name>.site and sync.site give it.
SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class SyncSettings(_Section):
    # An SQLite file, or a postgresql:// URL (its password never in it: in
    # state_db_password_env or state_db_password_file, at most one).
    state_db: str = "/var/lib/perksync/state.sqlite3"
    state_db_password_env: str | None = None
    state_db_password_file: str | None = None
    interval_seconds: Annotated[float, Field(ge=1, le=86_400)] = 60.0
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 16
    expiry_grace_seconds: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    # Store mode: how often new items are read, and how far back each read
    # looks again for items that became visible late.
    # Finished journal rows older than this are pruned (0: at the next pass).
    journal_retention_days: Annotated[float, Field(ge=0, le=36_500)] = 90.0
    new_items_seconds: Annotated[float, Field(ge=1, le=3_600)] = 5.0
    new_items_overlap_seconds: Annotated[float, Field(ge=0, le=3_600)] = 30.0
    # Several hosts on one PostgreSQL database: the site this host stands in;
    # it delivers only to the servers of that site.
    site: SiteName | None = None

    _state_db_password: SecretStr | None = PrivateAttr(default=None)

    @field_validator("state_db")
    @classmethod
    def _check_state_db(cls, value: str) -> str:
        if value.startswith("memory:"):
            raise ValueError(
                "a memory store forgets every delivered perk when perksync stops; give a file "
                "path or a postgresql:// URL"
            )
        # The message never repeats the value: it may hold a password.
        problem = postgres_url_problem(value) if is_postgres_url(value) else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _password_source(self) -> Self:
        given = [
            key for key in ("state_db_password_env", "state_db_password_file") if getattr(self, key)
        ]
        if len(given) > 1:
            raise ValueError("give at most one of state_db_password_env or state_db_password_file")
        if given and not is_postgres_url(self.state_db):
            raise ValueError(f"{given[0]}: only a postgresql:// state_db takes a password")
        return self

    @property
    def has_state_db_password(self) -> bool:
        return bool(self.state_db_password_env or self.state_db_password_file)


class HttpSettings(_Section):
    listen: str | None = None  # "127.0.0.1:9108"; off when unset

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9108")
        return value


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def _secret_sources(model: BaseModel, prefix: str) -> list[str]:
    return [f"{prefix}{s}" for s in ("_env", "_file", "") if getattr(model, f"{prefix}{s}")]


def _exactly_one(model: BaseModel, prefix: str) -> None:
    given = _secret_sources(model, prefix)
    if len(given) != 1:
        options = f"{prefix}_env, {prefix}_file or {prefix}"
        found = f" (found {', '.join(given)})" if given else ""
        raise ValueError(f"give exactly one of {options}{found}")


def _at_most_one(model: BaseModel, prefix: str) -> None:
    given = _secret_sources(model, prefix)
    if len(given) > 1:
        options = f"{prefix}_env, {prefix}_file or {prefix}"
        raise ValueError(f"give at most one of {options} (found {', '.join(given)})")


class CustomerLink(_Section):
    token_env: str | None = None
    token_file: str | None = None
    token: SecretStr | None = None
    # Optional name for logs and `perksync status` (default: where the token comes from).
    label: str | None = None

    # None until load_settings resolves it (a None default: pydantic deep-copies
    # a private attribute's default into every instance).
    _token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        _exactly_one(self, "token")
        return self

    @property
    def secret(self) -> SecretStr:
        if self._token is None:
            raise RuntimeError("the token is resolved by load_settings")
        return self._token

    def describe(self, index: int) -> str:
        if self.label:
            return self.label
        if self.token_env:
            return f"token_env {self.token_env}"
        if self.token_file:
            return f"token_file {self.token_file}"
        return f"customers[{index}]"


class ServerSettings(_Section):
    platform: str
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    password_env: str | None = None
    password_file: str | None = None
    password: SecretStr | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0
    # Regular expressions searched anywhere in a reply: a match marks the
    # command rejected (on top of the platform's own error replies).
    error_replies: list[str] = []
    # Regular expressions: a reply to an online-only command saying the player
    # is not there returns it to waiting (on top of the platform's own).
    offline_replies: list[str] = []
    # How the player list is read, where the game's differs from the
    # platform's default (`players_pattern`: a regular expression with a
    # group for the player's id).
    players_command: Annotated[str, Field(min_length=1)] | None = None
    players_pattern: str | None = None
    # The player list is read at most this often, only while a command waits.
    presence_seconds: Annotated[float, Field(ge=1, le=3_600)] = 10.0
    # Store mode: PayNow's id of this game server; an item whose
    # execute_on_gameserver_id is this id goes to this server only.
    paynow_gameserver_id: Annotated[str, Field(pattern=r"^[0-9]{1,20}$")] | None = None
    # Several hosts: the site the server stands in (only that site's hosts send to it).
    site: SiteName | None = None

    _password: SecretStr | None = PrivateAttr(default=None)

    @field_validator("error_replies", "offline_replies")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _compile(pattern)
        return value

    @field_validator("players_pattern")
    @classmethod
    def _players_pattern(cls, value: str | None) -> str | None:
        if value is not None and _compile(value).groups < 1:
            raise ValueError("needs a group for the player's id, e.g. (STEAM_[0-5]:[01]:\\d+)")
        return value

    @field_validator("platform")
    @classmethod
    def _known_platform(cls, value: str) -> str:
        if value not in PLATFORMS:
            raise ValueError(f"unknown platform {value!r}; use one of {', '.join(PLATFORMS)}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        _exactly_one(self, "password")
        return self

    @property
    def secret(self) -> SecretStr:
        if self._password is None:
            raise RuntimeError("the password is resolved by load_settings")
        return self._password


class CommandSettings(_Section):
    """A command written as a mapping: `{run: TEMPLATE, online: true, delay_seconds: 30}`."""

    run: str
    # Sent only while the customer's player is online on that server.
    online: bool = False
    # Not sent before this long after its event was journaled.
    delay_seconds: Annotated[float, Field(ge=0, le=30 * 86_400)] = 0.0
    # Runs for its own item whatever the product's shared perk does.
    per_item: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command of a product's event list (plain strings get the defaults)."""

    template: Template
    online: bool = False
    delay_seconds: float = 0.0
    per_item: bool = False


class ProductSettings(_Section):
    servers: list[str] | None = None  # None: every server
    # Items of every product with the same perk share one grant per customer
    # and server, as a rank does.
    perk: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
    # A one-time product (keys, coins): on_active runs on the servers it went
    # to when first granted, never again for a server added later nor by resend.
    once: bool = False
    on_active: list[str | CommandSettings] = []
    on_expire: list[str | CommandSettings] = []
    on_revoke: list[str | CommandSettings] = []

    _commands: dict[str, tuple[Command, ...]] = PrivateAttr(default_factory=dict)

    @field_validator("servers")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list routes to no server; omit the key for every server")
        return value

    def commands(self, event: str) -> tuple[Command, ...]:
        return self._commands.get(event, ())

    def templates(self, event: str) -> tuple[Template, ...]:
        return tuple(command.template for command in self.commands(event))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    paynow: PayNowSettings = PayNowSettings()
    sync: SyncSettings = SyncSettings()
    http: HttpSettings = HttpSettings()
    customers: list[CustomerLink] = []
    servers: dict[str, ServerSettings] = {}
    products: dict[str, ProductSettings] = {}

    # The folder relative paths in the file are resolved against.
    _base_dir: Path = PrivateAttr(default=Path("."))
    # Slugs written as `products.<slug>: ignore` (not in `products`).
    _ignored_products: frozenset[str] = PrivateAttr(default=frozenset())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed in as init values); our
        # own source, so that only single keys can be set and errors name the
        # variable (see `_environment_overrides`).
        return (_EnvironmentOverrides(settings_cls), init_settings)

    @property
    def state_db_postgres(self) -> bool:
        """The state is in PostgreSQL (`sync.state_db` is a postgresql:// URL)."""
        return is_postgres_url(self.sync.state_db)

    @property
    def state_db_path(self) -> Path:
        """The SQLite state file (meaningless when `state_db_postgres`)."""
        return self._resolve(self.sync.state_db)

    @property
    def state_db_url(self) -> str:
        """What `open_store` takes: the URL, or the SQLite file's resolved path."""
        return self.sync.state_db if self.state_db_postgres else str(self.state_db_path)

    @property
    def state_db_password(self) -> str | None:
        """The PostgreSQL password, resolved; None when none is configured."""
        secret = self.sync._state_db_password
        return None if secret is None else secret.get_secret_value()

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    @property
    def store_mode(self) -> bool:
        """A Management API key links every customer of the store (store mode);
        without one, each customer is linked by its token (token mode)."""
        return self.paynow.has_api_key

    @property
    def ignored_products(self) -> frozenset[str]:
        """Products deliberately not delivered: their items are not reported as missed."""
        return self._ignored_products

    @property
    def own_servers(self) -> list[str]:
        """The servers this host delivers to: its site's (`sync.site`), or every
        server when there are no sites."""
        site = self.sync.site
        return [name for name, s in self.servers.items() if site is None or s.site == site]

    def routes_for(self, product: str) -> list[str]:
        """The servers a product's commands go to (before per-customer routing)."""
        spec = self.products[product]
        return list(spec.servers) if spec.servers is not None else list(self.servers)


# libyaml's parser when PyYAML has it (8x faster: 10,000 customers load in a
# quarter of a second instead of two), the pure-Python one otherwise.
if yaml.__with_libyaml__:
    from yaml import CSafeLoader as _SafeLoader
else:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _UniqueKeyLoader(_SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (a silent override
    of a product or server is the kind of mistake that costs money)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('products', 'vip', 'on_active', 0) → 'products.vip.on_active[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _error_lines(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{format_loc(err['loc'])}: {msg}")
    return lines


# --- overrides from the environment ---------------------------------------------

ENV_PREFIX = "PERKSYNC_"
# Variables with the prefix that are not keys: the configuration file's path.
_NOT_KEYS = frozenset({"PERKSYNC_CONFIG"})
_SCALARS = (str, int, float, bool, SecretStr, NoneType)
_ONLY_SINGLE_KEYS = (
    "only single keys can be set from the environment (PERKSYNC_<SECTION>__<KEY>, "
    "PERKSYNC_SERVERS__<NAME>__<KEY>): write {what} in the configuration file"
)


def _environment_overrides(
    data: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Every `PERKSYNC_<SECTION>__<KEY>` and `PERKSYNC_SERVERS__<NAME>__<KEY>`
    variable as a nested mapping of overrides for the file's `data` (names are
    not case sensitive); which key path each variable set; one error line per
    bad one.

    Only single values (a string, number or boolean) can be set: sections,
    lists and mappings (`PERKSYNC_PAYNOW`, `PERKSYNC_CUSTOMERS`, products)
    are refused rather than parsed as JSON, and an override never adds a
    server. Other `PERKSYNC_*` names without `__` are not ours and are left
    alone (`PERKSYNC_CONFIG` is the file's path)."""
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    errors: list[str] = []
    for variable in sorted(env):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in _NOT_KEYS:
            continue
        parts = name.removeprefix(ENV_PREFIX).lower().split("__")
        if len(parts) == 1 and parts[0] not in Settings.model_fields:
            continue
        try:
            path = _override_path(parts, data.get("servers"))
        except ValueError as exc:
            errors.append(f"{variable}: {exc}")
            continue
        if not env[variable].strip():
            errors.append(f"{variable}: is empty (give a value, or unset it to keep the file's)")
            continue
        if not _is_mapping_along(data, path[:-1]):
            continue  # the file's section is not a mapping: its own error says so
        overrides = _set_key(overrides, path, env[variable])
        origins[format_loc(path)] = variable
    return overrides, origins, errors


def _override_path(parts: list[str], servers: Any) -> tuple[str, ...]:
    """The key path a variable's name parts stand for; ValueError if none."""
    section, rest = parts[0], parts[1:]
    field = Settings.model_fields.get(section)
    if field is None:
        raise ValueError(f"no section {section!r} ({', '.join(Settings.model_fields)})")
    model = field.annotation
    path: tuple[str, ...] = (section,)
    if section == "servers" and rest:
        path, model, rest = (section, _server_named(rest[0], servers)), ServerSettings, rest[1:]
    if not rest or not isinstance(model, type) or not issubclass(model, BaseModel):
        raise ValueError(_ONLY_SINGLE_KEYS.format(what=format_loc(path)))
    key = rest[0]
    sub = model.model_fields.get(key)
    if sub is None or len(rest) > 1:
        raise ValueError(f"no key {format_loc((*path, *rest))}")
    options = get_args(sub.annotation) if isinstance(sub.annotation, UnionType) else ()
    if not all(option in _SCALARS for option in options or (sub.annotation,)):
        raise ValueError(_ONLY_SINGLE_KEYS.format(what=format_loc((*path, key))))
    return (*path, key)


def _server_named(lowered: str, servers: Any) -> str:
    """The file's name of the server a variable names (case does not matter)."""
    names = [n for n in servers if str(n).lower() == lowered] if isinstance(servers, dict) else []
    if len(names) != 1:
        which = "no server" if not names else "more than one server"
        raise ValueError(f"{which} named {lowered!r} (any case) in the configuration file")
    return str(names[0])


def _is_mapping_along(data: Any, path: tuple[str, ...]) -> bool:
    """Whether every key of `path` in `data` is a mapping or absent."""
    for key in path:
        if data is None:
            return True
        if not isinstance(data, dict):
            return False
        data = data.get(key)
    return data is None or isinstance(data, dict)


def _set_key(data: dict[str, Any], path: tuple[str, ...], value: str) -> dict[str, Any]:
    """A copy of `data` with `path` set to `value`."""
    head, rest = path[0], path[1:]
    if not rest:
        return {**data, head: value}
    return {**data, head: _set_key(data.get(head) or {}, rest, value)}


class _EnvironmentOverrides(PydanticBaseSettingsSource):
    """The settings source of the `PERKSYNC_*` overrides, checked and nested by
    `_environment_overrides` for the one `load_settings` call under way."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ gives every value at once

    def __call__(self) -> dict[str, Any]:
        return _OVERRIDES.get()


# What `_EnvironmentOverrides` hands to pydantic-settings: set by `load_settings`
# around the construction of `Settings` (a class method builds the sources,
# so they cannot be handed the overrides directly).
_OVERRIDES: ContextVar[dict[str, Any]] = ContextVar("perksync_overrides", default={})  # noqa: B039


def _name_variables(lines: list[str], origins: Mapping[str, str]) -> list[str]:
    """Error lines about a key a variable set name the variable instead; one
    about the section of such a key says which variables are set in it."""
    named = []
    for line in lines:
        where, sep, what = line.partition(": ")
        if where in origins:
            line = f"{origins[where]}{sep}{what}"
        else:
            inside = [v for key, v in origins.items() if key.startswith(where + ".")]
            if inside:
                line += f" ({', '.join(inside)} set in the environment)"
        named.append(line)
    return named


# systemd sets it for a unit's LoadCredential=; a command run by hand outside
# the unit lacks it.
_CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
_CREDENTIALS_HINT = (
    " (systemd sets it for the service; run perksync by hand through systemd-run with "
    'the unit\'s LoadCredential=, as README "Install" shows)'
)


def _read_secret(
    model: BaseModel, prefix: str, where: str, base_dir: str, env: Mapping[str, str]
) -> SecretStr:
    env_name = getattr(model, f"{prefix}_env")
    file_name = getattr(model, f"{prefix}_file")
    if env_name:
        value = env.get(env_name)
        if not value or not value.strip():
            raise ConfigError(f"{where}.{prefix}_env: {_unset_or_empty(env_name, value)}")
        return SecretStr(value.strip())
    if file_name:
        for match in _VARIABLE.finditer(file_name):
            name = match[1] or match[2]
            if not env.get(name):
                problem = _unset_or_empty(name, env.get(name))
                hint = _CREDENTIALS_HINT if name == _CREDENTIALS_VARIABLE else ""
                raise ConfigError(f"{where}.{prefix}_file: {problem}{hint}")
        # ${CREDENTIALS_DIRECTORY} is how systemd's LoadCredential= is reached.
        expanded = _VARIABLE.sub(lambda m: env[m[1] or m[2]], file_name)
        # os.path rather than pathlib: ten thousand token files load noticeably faster.
        path = os.path.join(base_dir, os.path.expanduser(expanded))
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise ConfigError(f"{where}.{prefix}_file: cannot read {path}: {reason}") from None
        if not value:
            raise ConfigError(f"{where}.{prefix}_file: {path} is empty")
        return SecretStr(value)
    inline: SecretStr = getattr(model, prefix)
    if not inline.get_secret_value().strip():
        raise ConfigError(f"{where}.{prefix}: is empty")
    return SecretStr(inline.get_secret_value().strip())


def _split_ignored(data: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str], list[str]]:
    """Take `products.<slug>: ignore` entries out of the file's data (they have no
    mapping to validate); any other word there is an error naming the key."""
    products = data.get("products")
    if not isinstance(products, dict):
        return data, frozenset(), []
    ignored, errors, mapped = set(), [], {}
    for slug, spec in products.items():
        if not isinstance(spec, str):
            mapped[slug] = spec
        elif spec == IGNORE:
            ignored.add(str(slug))
        else:
            errors.append(
                f"products.{slug}: {spec!r} is not a product: give a mapping "
                f"(servers, on_active, …) or the word {IGNORE} to deliver nothing for it"
            )
    return {**data, "products": mapped}, frozenset(ignored), errors


def _unset_or_empty(name: str, value: str | None) -> str:
    return f"environment variable {name} is {'not set' if value is None else 'empty'}"


def _check_cross_references(settings: Settings) -> list[str]:
    errors = []
    for name in settings.servers:
        if not _NAME.match(name):
            errors.append(
                f"servers.{name}: server names may use letters, digits, '_', '.', '-' (max 64)"
            )
    for slug, product in settings.products.items():
        for i, server in enumerate(product.servers or []):
            if server not in settings.servers:
                known = ", ".join(settings.servers) or "none are configured"
                errors.append(f"products.{slug}.servers[{i}]: unknown server {server!r} ({known})")
        for event in EVENT_KEYS:
            commands = []
            for i, written in enumerate(getattr(product, event)):
                spec = written if isinstance(written, CommandSettings) else None
                text = spec.run if spec is not None else written
                where = f"products.{slug}.{event}[{i}]" + (".run" if spec is not None else "")
                try:
                    template = parse_template(text, store_mode=settings.store_mode)
                except TemplateError as exc:
                    errors.append(f"{where}: {exc}")
                    continue
                if not text.strip():
                    errors.append(f"{where}: empty command")
                if spec is None:
                    commands.append(Command(template))
                else:
                    commands.append(
                        Command(template, spec.online, spec.delay_seconds, spec.per_item)
                    )
            product._commands[event] = tuple(commands)
    errors += _check_mode(settings)
    errors += _check_sites(settings)
    missing = postgres_driver_missing() if settings.state_db_postgres else None
    if missing is not None:
        errors.append(f"sync.state_db: {missing}")
    if settings.products and not settings.servers:
        errors.append("servers: no server is configured, so no product can be delivered")
    seen_tokens: dict[str, int] = {}
    for i, link in enumerate(settings.customers):
        key = link.token_env or link.token_file or ""
        if key and key in seen_tokens:
            errors.append(f"customers[{i}]: the same token source as customers[{seen_tokens[key]}]")
        seen_tokens.setdefault(key, i)
    return errors


def _check_mode(settings: Settings) -> list[str]:
    """Store mode's keys go together and exclude the token mode's."""
    paynow = settings.paynow
    errors = []
    if paynow.has_api_key and paynow.store_id is None:
        errors.append("paynow.store_id: store mode (an API key is given) needs the store's id")
    if paynow.store_id is not None and not paynow.has_api_key:
        errors.append(
            "paynow.store_id: store mode needs a Management API key too "
            "(paynow.api_key_env, api_key_file or api_key)"
        )
    if paynow.has_api_key and settings.customers:
        errors.append(
            "customers: store mode (paynow.api_key) links every customer of the store; "
            "remove the customers list, or the API key for token mode"
        )
    if paynow.has_webhook_secret and not paynow.has_api_key:
        errors.append("paynow.webhook_secret: webhooks need store mode (paynow.api_key)")
    if paynow.has_webhook_secret and not settings.http.listen:
        errors.append(
            "paynow.webhook_secret: webhooks arrive on http.listen, which is not set "
            "(e.g. http.listen: 127.0.0.1:9108)"
        )
    return errors


def _check_sites(settings: Settings) -> list[str]:
    """Sites go all the way or not at all, need a shared (PostgreSQL) state, and
    a shared state needs leases that outlast every server's RCON timeout."""
    servers, site = settings.servers, settings.sync.site
    sites = sorted({s.site for s in servers.values() if s.site is not None})
    errors = [
        f"servers.{name}.site: not set, but other servers have sites ({', '.join(sites)}): "
        "give every server a site, or none"
        for name, s in servers.items()
        if sites and s.site is None
    ]
    if sites and site is None:
        errors.append(f"sync.site: not set, but the servers have sites: name this host's "
                      f"({', '.join(sites)})")  # fmt: skip
    elif site is not None and not sites:
        errors.append(
            "sync.site: no server has a site: set servers.<name>.site, or remove sync.site"
        )
    elif site is not None and site not in sites:
        errors.append(f"sync.site: no server has site {site!r} ({', '.join(sites)})")
    if (sites or site is not None) and not settings.state_db_postgres:
        errors.append(
            "sync.site: sites are for several hosts sharing a postgresql:// sync.state_db; "
            "with SQLite there is one host"
        )
    return errors + _check_lease_timing(settings)


def _check_lease_timing(settings: Settings) -> list[str]:
    """A shared state: a host sends only while its lease outlives the RCON timeout."""
    if not settings.state_db_postgres or not settings.servers:
        return []
    name, slowest = max(settings.servers.items(), key=lambda pair: pair[1].timeout_seconds)
    timeout = slowest.timeout_seconds
    interval = settings.sync.interval_seconds
    timing = LeaseTiming.of(interval, timeout)
    if timing.sends(timeout):
        return []
    return [
        f"sync.interval_seconds: {interval:g} is too short for servers.{name}.timeout_seconds "
        f"{timeout:g} on a postgresql:// state: hosts take over within one interval, so a "
        f"lease lasts {timing.lease_seconds:g}s, and a host sends only while its lease "
        f"outlives the RCON timeout; make sync.interval_seconds more than "
        f"{LeaseTiming.shortest_interval(timeout):g}, "
        "or the timeout shorter"
    ]


def _resolve_secrets(settings: Settings, base_dir: str, env: Mapping[str, str]) -> list[str]:
    """Read every secret the settings name; one error line per one that fails."""
    errors = []
    jobs: list[tuple[BaseModel, str, str, str]] = [
        (link, "token", f"customers[{i}]", "_token") for i, link in enumerate(settings.customers)
    ]
    # A host of a site reads only its own site's RCON passwords (it sends nowhere else).
    own = set(settings.own_servers)
    jobs += [
        (s, "password", f"servers.{n}", "_password")
        for n, s in settings.servers.items()
        if n in own
    ]
    if settings.paynow.has_api_key:
        jobs.append((settings.paynow, "api_key", "paynow", "_api_key"))
    if settings.paynow.has_webhook_secret:
        jobs.append((settings.paynow, "webhook_secret", "paynow", "_webhook_secret"))
    if settings.sync.has_state_db_password:
        jobs.append((settings.sync, "state_db_password", "sync", "_state_db_password"))
    for model, prefix, where, attribute in jobs:
        try:
            setattr(model, attribute, _read_secret(model, prefix, where, base_dir, env))
        except ConfigError as exc:
            errors.append(str(exc))
    return errors


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Load, validate and resolve the configuration, or raise ConfigError."""
    env = os.environ if env is None else env
    data = _read_yaml(path)
    overrides, origins, env_errors = _environment_overrides(data, env)
    if env_errors:  # a bad variable is not applied: checking the file now would mislead
        raise ConfigError("\n".join(env_errors))
    data, ignored, errors = _split_ignored(data)
    applied = _OVERRIDES.set(overrides)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        lines = [*errors, *_error_lines(exc)]
        raise ConfigError("\n".join(_name_variables(lines, origins))) from None
    finally:
        _OVERRIDES.reset(applied)
    base_dir = path.resolve().parent
    settings._base_dir = base_dir
    settings._ignored_products = ignored
    errors += _check_cross_references(settings)
    errors += _resolve_secrets(settings, str(base_dir), env)
    if errors:
        raise ConfigError("\n".join(_name_variables(errors, origins)))
    return settings


def config_path_from(cli_value: str | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if cli_value:
        return Path(cli_value)
    if env.get("PERKSYNC_CONFIG"):
        return Path(env["PERKSYNC_CONFIG"])
    return DEFAULT_CONFIG_PATH


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EVENT_KEYS",
    "IGNORE",
    "Command",
    "CommandSettings",
    "ConfigError",
    "CustomerLink",
    "HttpSettings",
    "PayNowSettings",
    "ProductSettings",
    "ServerSettings",
    "Settings",
    "SyncSettings",
    "config_path_from",
    "format_loc",
    "load_settings",
]
