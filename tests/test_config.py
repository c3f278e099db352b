"""config.yaml loading: every error names its key path; secrets resolve; nothing leaks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from daemon.config import ConfigError, config_path_from, format_loc, load_settings

REPO = Path(__file__).resolve().parent.parent

GOOD = """
paynow:
  api_url: http://127.0.0.1:9
sync:
  state_db: state.sqlite3
customers:
  - token_env: TOKEN_A
  - token_file: tokens/b
    label: bob
servers:
  survival:
    platform: minecraft
    host: 127.0.0.1
    port: 25575
    password_env: MC_PASS
  jail:
    platform: source
    host: 127.0.0.1
    port: 27015
    password: inline-secret
products:
  vip:
    servers: [survival]
    on_active: ["lp user {customer.minecraft_uuid} parent add vip"]
    on_expire: ["lp user {customer.minecraft_uuid} parent remove vip"]
  kit:
    on_active: ["give {customer.minecraft.name} diamond 1", "sm_give {customer.steam_id2}"]
"""

ENV = {"TOKEN_A": "tok-a-SECRET", "MC_PASS": "mc-SECRET"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    (tmp_path / "tokens").mkdir(exist_ok=True)
    (tmp_path / "tokens" / "b").write_text("tok-b-SECRET\n")
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env=ENV if env is None else env)
    return str(info.value)


def test_good_config_loads_and_resolves(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), env=ENV)
    assert settings.customers[0].secret.get_secret_value() == "tok-a-SECRET"
    assert settings.customers[1].secret.get_secret_value() == "tok-b-SECRET"
    assert settings.customers[1].describe(1) == "bob"
    assert settings.customers[0].describe(0) == "token_env TOKEN_A"
    assert settings.servers["survival"].secret.get_secret_value() == "mc-SECRET"
    assert settings.servers["jail"].secret.get_secret_value() == "inline-secret"
    assert settings.state_db_path == tmp_path.resolve() / "state.sqlite3"
    assert settings.routes_for("vip") == ["survival"]
    assert settings.routes_for("kit") == ["survival", "jail"]
    assert [t.text for t in settings.products["kit"].templates("on_active")] == [
        "give {customer.minecraft.name} diamond 1",
        "sm_give {customer.steam_id2}",
    ]
    assert settings.products["kit"].templates("on_revoke") == ()
    assert settings.sync.interval_seconds == 60
    assert settings.sync.concurrency == 16


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), env=ENV)
    dumped = repr(settings) + str(settings.model_dump())
    for secret in ("tok-a-SECRET", "tok-b-SECRET", "mc-SECRET", "inline-secret"):
        assert secret not in dumped


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("paynow:\n", "paynow:\n  colour: blue\n"), "paynow.colour: unknown key"),
        (("products:\n", "products:\n  bad:\n    on_grant: [x]\n"), "products.bad.on_grant: unknown key"),
        (
            ("parent add vip", "parent add {customer.nmae}"),
            "products.vip.on_active[0]: ",
        ),
        (("servers: [survival]", "servers: [survivl]"), "products.vip.servers[0]: unknown server"),
        (("platform: source", "platform: bedrock"), "servers.jail.platform: "),
        (("port: 25575", "port: 70000"), "servers.survival.port: "),
        (("port: 25575", "port: many"), "servers.survival.port: "),
        (("api_url: http://127.0.0.1:9", "api_url: http://paynow.example"), "paynow.api_url: "),
        (
            ("api_url: http://127.0.0.1:9", "api_url: https://api.paynow.gg/v1"),
            "paynow.api_url: api_url must be the API's root, without a path (got /v1): "
            "write https://api.paynow.gg; perksync adds /v1/store/... itself",
        ),
        (("password: inline-secret", "password_env: NOPE"), "servers.jail.password_env: environment variable NOPE is not set"),
        (("token_file: tokens/b", "token_file: tokens/missing"), "customers[1].token_file: cannot read"),
        (("  - token_env: TOKEN_A\n", "  - token_env: TOKEN_A\n    token: abc\n"), "customers[0]: "),
        (("    port: 27015\n", "    port: 27015\n    password_env: MC_PASS\n"), "servers.jail: "),
        (("    servers: [survival]\n", "    servers: []\n"), "products.vip.servers: "),
        (("sync:\n", "sync:\n  interval_seconds: 0\n"), "sync.interval_seconds: "),
    ],
)  # fmt: skip
def test_errors_name_the_key_path(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD
    message = error_of(tmp_path, GOOD.replace(old, new, 1))
    assert expected in message, message
    assert "Traceback" not in message


def test_a_product_set_to_ignore_is_known_but_not_mapped(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD + "  crate-key: ignore\n"), env=ENV)
    assert settings.ignored_products == frozenset({"crate-key"})
    assert set(settings.products) == {"vip", "kit"}


@pytest.mark.parametrize("word", ["ignored", "IGNORE", "''", "vip"])
def test_any_other_word_for_a_product_is_an_error(tmp_path: Path, word: str) -> None:
    text = GOOD + f"  crate-key: {word}\nhttp:\n  bogus: 1\n"
    lines = error_of(tmp_path, text).splitlines()
    assert lines[0].startswith("products.crate-key: ")
    assert "is not a product: give a mapping (servers, on_active, …) or the word ignore" in lines[0]
    assert lines[1] == "http.bogus: unknown key"  # reported with the others


def test_unknown_placeholder_message_names_it(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace("parent add vip", "parent add {customer.nmae}", 1))
    assert message.startswith("products.vip.on_active[0]: ")
    assert "customer.nmae" in message


def test_missing_secret_message_never_shows_other_secrets(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD, env={"TOKEN_A": "tok-a-SECRET"})
    assert message == "servers.survival.password_env: environment variable MC_PASS is not set"


def test_several_errors_each_on_own_line(tmp_path: Path) -> None:
    text = GOOD.replace("servers: [survival]", "servers: [nope]").replace(
        "password: inline-secret", "password_env: NOPE"
    )
    lines = error_of(tmp_path, text).splitlines()
    assert any(line.startswith("products.vip.servers[0]:") for line in lines)
    assert any(line.startswith("servers.jail.password_env:") for line in lines)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = GOOD.replace("  kit:\n", "  vip:\n")
    message = error_of(tmp_path, text)
    assert "duplicate key 'vip'" in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "paynow:\n  api_url: [unclosed\n")
    assert "config.yaml:" in message and "invalid YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.yaml", env={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    overrides = {
        "PERKSYNC_SYNC__INTERVAL_SECONDS": "30",
        "PERKSYNC_PAYNOW__TIMEOUT_SECONDS": "3",
        "PERKSYNC_HTTP__LISTEN": "127.0.0.1:9108",  # a section the file leaves out
        "PERKSYNC_SERVERS__SURVIVAL__PORT": "25580",
        "perksync_servers__jail__host": "10.0.0.2",  # names are not case sensitive
        # Not keys: the file's path, and names of other tools (the test suite's).
        "PERKSYNC_CONFIG": "elsewhere.yaml",
        "PERKSYNC_SOAK_SECONDS": "5",
    }
    settings = load_settings(write(tmp_path, GOOD), env={**ENV, **overrides})
    assert settings.sync.interval_seconds == 30
    assert settings.paynow.timeout_seconds == 3
    assert settings.paynow.api_url == "http://127.0.0.1:9"
    assert settings.http.listen == "127.0.0.1:9108"
    assert settings.servers["survival"].port == 25580
    assert settings.servers["survival"].host == "127.0.0.1"
    assert settings.servers["jail"].host == "10.0.0.2"


SINGLE_KEYS_ONLY = "only single keys can be set from the environment"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PERKSYNC_SYNC__CONCURRENCY", "lots", "Input should be a valid integer"),
        ("PERKSYNC_SYNC__INTERVAL_SECONDS", "0", "Input should be greater than or equal to 1"),
        ("PERKSYNC_SERVERS__SURVIVAL__PORT", "70000", "Input should be less than or equal to 65535"),
        ("PERKSYNC_PAYNOW__API_URL", "https://api.paynow.gg/v1", "api_url must be the API's root"),
        ("PERKSYNC_SYNC__INTERVAL_SECONDS", "", "is empty (give a value, or unset it to keep the file's)"),
        ("PERKSYNC_HTTP__LISTEN", "  ", "is empty"),
        ("PERKSYNC_PAYNOW", "https://api.paynow.gg", f"{SINGLE_KEYS_ONLY} (PERKSYNC_<SECTION>__<KEY>, PERKSYNC_SERVERS__<NAME>__<KEY>): write paynow in the configuration file"),
        ("PERKSYNC_CUSTOMERS", "[{bad json", f"{SINGLE_KEYS_ONLY} "),
        ("PERKSYNC_CUSTOMERS", '[{"token": "abc"}]', "write customers in the configuration file"),
        ("PERKSYNC_SERVERS", "{}", "write servers in the configuration file"),
        ("PERKSYNC_SERVERS__JAIL", "{}", "write servers.jail in the configuration file"),
        ("PERKSYNC_PRODUCTS__VIP__ON_ACTIVE", "say hi", "write products in the configuration file"),
        ("PERKSYNC_SYNC__INTERVL_SECONDS", "5", "no key sync.intervl_seconds"),
        ("PERKSYNC_SYNC__INTERVAL_SECONDS__MAX", "5", "no key sync.interval_seconds.max"),
        ("PERKSYNC_SYNCH__INTERVAL_SECONDS", "5", "no section 'synch' (paynow, sync, http, customers, servers, products)"),
        ("PERKSYNC_SERVERS__LOBBY__PORT", "25575", "no server named 'lobby' (any case) in the configuration file"),
    ],
)  # fmt: skip
def test_bad_environment_override_names_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    message = error_of(tmp_path, GOOD, env={**ENV, variable: value})
    assert message.startswith(f"{variable}: "), message
    assert expected in message
    assert "\n" not in message


def test_error_in_a_section_a_variable_changed_says_so(tmp_path: Path) -> None:
    env = {**ENV, "PERKSYNC_SERVERS__JAIL__PASSWORD_ENV": "MC_PASS"}  # the file has `password`
    assert error_of(tmp_path, GOOD, env=env) == (
        "servers.jail: give exactly one of password_env, password_file or password "
        "(found password_env, password) (PERKSYNC_SERVERS__JAIL__PASSWORD_ENV set in the environment)"
    )


def test_empty_secret_variable_is_called_empty_not_unset(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD, env={**ENV, "MC_PASS": ""})
    assert message == "servers.survival.password_env: environment variable MC_PASS is empty"
    text = GOOD.replace("token_file: tokens/b", "token_file: ${CREDENTIALS_DIRECTORY}/bob")
    message = error_of(tmp_path, text, env={**ENV, "CREDENTIALS_DIRECTORY": ""})
    assert message.startswith(
        "customers[1].token_file: environment variable CREDENTIALS_DIRECTORY is empty (systemd "
    )


def test_config_path_precedence() -> None:
    assert config_path_from("x.yaml", {"PERKSYNC_CONFIG": "y.yaml"}) == Path("x.yaml")
    assert config_path_from(None, {"PERKSYNC_CONFIG": "y.yaml"}) == Path("y.yaml")
    assert config_path_from(None, {}) == Path("/etc/perksync/config.yaml")


def test_format_loc() -> None:
    assert format_loc(("products", "vip", "on_active", 0)) == "products.vip.on_active[0]"
    assert format_loc(("customers", 2, "token_env")) == "customers[2].token_env"


def test_example_config_is_valid(tmp_path: Path) -> None:
    """The annotated config.yaml operators start from must load (given its secrets)."""
    names = ("paynow_api_key", "paynow_webhook_secret", "rcon_survival", "rcon_jailbreak")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in names:
        (credentials / f"perksync_{name}").write_text(f"{name}-secret\n")
    settings = load_settings(REPO / "config.yaml", env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.store_mode
    assert settings.paynow.api_key_secret.get_secret_value() == "paynow_api_key-secret"
    assert set(settings.servers) == {"survival", "jailbreak"}
    assert set(settings.products) == {"vip", "jailbreak-warden"}
    assert settings.ignored_products == frozenset({"gift-card"})


def test_credentials_directory_is_expanded(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "bob").write_text("tok-from-credentials\n")
    text = GOOD.replace("token_file: tokens/b", "token_file: ${CREDENTIALS_DIRECTORY}/bob")
    env = {**ENV, "CREDENTIALS_DIRECTORY": str(creds)}
    settings = load_settings(write(tmp_path, text), env=env)
    assert settings.customers[1].secret.get_secret_value() == "tok-from-credentials"


def test_unset_variable_in_secret_path_is_named(tmp_path: Path) -> None:
    text = GOOD.replace("token_file: tokens/b", "token_file: ${CREDENTIALS_DIRECTORY}/bob")
    message = error_of(tmp_path, text)
    assert message == (
        "customers[1].token_file: environment variable CREDENTIALS_DIRECTORY is not set (systemd "
        "sets it for the service; run perksync by hand through systemd-run with the unit's "
        'LoadCredential=, as README "Install" shows)'
    )


def test_an_unset_variable_other_than_the_credentials_folder_gets_no_systemd_hint(
    tmp_path: Path,
) -> None:
    text = GOOD.replace("token_file: tokens/b", "token_file: ${TOKENS}/bob")
    assert error_of(tmp_path, text) == (
        "customers[1].token_file: environment variable TOKENS is not set"
    )


PG = "postgresql://perksync@db.example:5432/perksync"


def test_a_postgresql_state_takes_its_password_from_the_environment_or_a_file(
    tmp_path: Path,
) -> None:
    text = GOOD.replace(
        "state_db: state.sqlite3", f"state_db: {PG}\n  state_db_password_env: PG_PW"
    )
    settings = load_settings(write(tmp_path, text), env={**ENV, "PG_PW": " pg-SECRET\n"})
    assert (settings.state_db_postgres, settings.state_db_url) == (True, PG)
    assert settings.state_db_password == "pg-SECRET"
    assert "pg-SECRET" not in repr(settings) + str(settings.model_dump())

    (tmp_path / "pg").write_text("pg-file-SECRET\n")
    text = GOOD.replace("state_db: state.sqlite3", f"state_db: {PG}\n  state_db_password_file: pg")
    assert load_settings(write(tmp_path, text), env=ENV).state_db_password == "pg-file-SECRET"

    plain = load_settings(write(tmp_path, GOOD), env=ENV)
    assert (plain.state_db_postgres, plain.state_db_password) == (False, None)
    assert plain.state_db_url == str(tmp_path.resolve() / "state.sqlite3")


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (
            "state_db: postgresql://perksync:pg-SECRET@db.example/perksync",
            "sync.state_db: the URL holds a password: remove it from the URL, and give it in "
            "sync.state_db_password_env or sync.state_db_password_file",
        ),
        (
            f"state_db: {PG}\n  state_db_password_env: A\n  state_db_password_file: b",
            "sync: give at most one of state_db_password_env or state_db_password_file",
        ),
        (
            "state_db: state.sqlite3\n  state_db_password_env: PG_PW",
            "sync: state_db_password_env: only a postgresql:// state_db takes a password",
        ),
        (
            f"state_db: {PG}\n  state_db_password_env: PG_PW",
            "sync.state_db_password_env: environment variable PG_PW is not set",
        ),
    ],
)
def test_a_postgresql_states_errors_name_the_key(tmp_path: Path, state: str, expected: str) -> None:
    message = error_of(tmp_path, GOOD.replace("state_db: state.sqlite3", state))
    assert message == expected
    assert "pg-SECRET" not in message


def test_a_password_in_a_state_url_from_the_environment_names_the_variable(
    tmp_path: Path,
) -> None:
    env = {**ENV, "PERKSYNC_SYNC__STATE_DB": "postgres://u:pg-SECRET@h/d"}
    message = error_of(tmp_path, GOOD, env)
    assert message.startswith("PERKSYNC_SYNC__STATE_DB: the URL holds a password: ")
    assert "pg-SECRET" not in message


def test_a_memory_store_is_refused_as_the_state(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("sync:\n  state_db: memory://x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^sync\.state_db: a memory store forgets"):
        load_settings(path, env={})
