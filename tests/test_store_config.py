"""Store mode's keys in config.yaml: what goes together, what excludes what,
and that every mistake is one line naming the key (exit 2, nothing contacted)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from daemon.config import ConfigError, Settings, load_settings
from tests.fakes.world import World

STORE = """
paynow:
  api_url: http://127.0.0.1:9
  store_id: "94688451781206016"
  api_key_env: PAYNOW_API_KEY
sync:
  state_db: state.sqlite3
servers:
  survival:
    platform: minecraft
    host: 127.0.0.1
    port: 25575
    password: rcon-SECRET
products:
  vip:
    on_active: ["lp user {customer.minecraft_uuid} parent add vip"]
"""
ENV = {"PAYNOW_API_KEY": "pnapi_KEY-SECRET", "PAYNOW_WEBHOOK": "whsec-SECRET", "TOKEN": "tok"}


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_settings(path, env=ENV if env is None else env)


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    message = str(info.value)
    for secret in ENV.values():
        assert secret not in message or secret == "tok"
    return message.splitlines()


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def test_a_store_id_and_an_api_key_select_store_mode(tmp_path: Path) -> None:
    settings = load(tmp_path, STORE)
    assert settings.store_mode
    paynow = settings.paynow
    assert paynow.api_key_secret.get_secret_value() == ENV["PAYNOW_API_KEY"]
    assert paynow.webhook_secret_value is None


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            '  store_id: "94688451781206016"\n',
            "",
            "paynow.store_id: store mode (an API key",
            id="key-without-store-id",
        ),
        pytest.param(
            "  api_key_env: PAYNOW_API_KEY\n",
            "",
            "paynow.store_id: store mode needs a Management API key",
            id="store-id-without-key",
        ),
        pytest.param(
            "sync:\n",
            "customers:\n  - token_env: TOKEN\nsync:\n",
            "customers: store mode (paynow.api_key) links every customer",
            id="customers-with-a-key",
        ),
        pytest.param(
            "  api_key_env: PAYNOW_API_KEY\n",
            "  api_key_env: PAYNOW_API_KEY\n  webhook_secret_env: PAYNOW_WEBHOOK\n",
            "paynow.webhook_secret: webhooks arrive on http.listen, which is not set",
            id="webhook-secret-without-listen",
        ),
        pytest.param(
            "  api_key_env: PAYNOW_API_KEY\n",
            "  api_key_env: NOT_SET\n",
            "paynow.api_key_env: environment variable NOT_SET is not set",
            id="key-variable-unset",
        ),
        pytest.param(
            "  api_key_env: PAYNOW_API_KEY\n",
            "  api_key_env: PAYNOW_API_KEY\n  api_key: inline\n",
            "paynow: give at most one of api_key_env, api_key_file or api_key",
            id="two-keys",
        ),
        pytest.param(
            '  store_id: "94688451781206016"\n',
            "  store_id: my-store\n",
            "paynow.store_id: String should match pattern",
            id="store-id-not-an-id",
        ),
        pytest.param(
            "  state_db: state.sqlite3\n",
            "  state_db: state.sqlite3\n  new_items_seconds: 0\n",
            "sync.new_items_seconds: Input should be greater than or equal to 1",
            id="new-items-zero",
        ),
        pytest.param(
            "    port: 25575\n",
            "    port: 25575\n    paynow_gameserver_id: survival\n",
            "servers.survival.paynow_gameserver_id: String should match pattern",
            id="gameserver-id",
        ),
    ],
)
def test_store_mode_mistakes_name_their_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    lines = error_of(tmp_path, edit(STORE, old, new))
    assert any(line.startswith(expected) for line in lines), lines


def test_a_webhook_secret_needs_store_mode(tmp_path: Path) -> None:
    text = edit(STORE, '  store_id: "94688451781206016"\n  api_key_env: PAYNOW_API_KEY\n', "")
    text = edit(text, "sync:\n", "customers:\n  - token_env: TOKEN\nsync:\n")
    text = edit(
        text,
        "  api_url: http://127.0.0.1:9\n",
        "  api_url: http://127.0.0.1:9\n  webhook_secret_env: PAYNOW_WEBHOOK\n",
    )
    text += "http:\n  listen: 127.0.0.1:9108\n"
    lines = error_of(tmp_path, text)
    assert lines == ["paynow.webhook_secret: webhooks need store mode (paynow.api_key)"]


def test_webhooks_with_http_listen_load(tmp_path: Path) -> None:
    text = edit(
        STORE,
        "  api_key_env: PAYNOW_API_KEY\n",
        "  api_key_env: PAYNOW_API_KEY\n  webhook_secret_env: PAYNOW_WEBHOOK\n",
    )
    settings = load(tmp_path, text + "http:\n  listen: 127.0.0.1:9108\n")
    secret = settings.paynow.webhook_secret_value
    assert secret is not None and secret.get_secret_value() == ENV["PAYNOW_WEBHOOK"]
    assert ENV["PAYNOW_WEBHOOK"] not in repr(settings)


@pytest.mark.parametrize(
    "placeholder", ["customer.metadata.discord", "item.custom_variables.colour"]
)
def test_store_mode_placeholders_are_unknown_in_token_mode(
    tmp_path: Path, placeholder: str
) -> None:
    token_mode = edit(STORE, '  store_id: "94688451781206016"\n  api_key_env: PAYNOW_API_KEY\n', "")
    token_mode = edit(token_mode, "sync:\n", "customers:\n  - token_env: TOKEN\nsync:\n")
    command = f'"say {{{placeholder}}}"'
    text = edit(token_mode, '["lp user {customer.minecraft_uuid} parent add vip"]', f"[{command}]")
    assert error_of(tmp_path, text) == [
        f"products.vip.on_active[0]: unknown placeholder {{{placeholder}}}: it exists in store "
        "mode only (paynow.api_key)"
    ]
    store_mode = edit(STORE, '["lp user {customer.minecraft_uuid} parent add vip"]', f"[{command}]")
    load(tmp_path, store_mode)


def test_a_bad_store_mode_config_exits_2_and_contacts_nothing(tmp_path: Path) -> None:
    with World(tmp_path, {"survival": "minecraft"}, store=True) as world:
        world.config({"vip": {"on_active": ["say {customer.name}"]}}, webhooks=True)
        for args in (["--sync-now"], ["--check-config"], []):
            result = world.run_cli(*args, timeout=30)
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip().endswith(
                "config error: paynow.webhook_secret: webhooks arrive on http.listen, which is "
                "not set (e.g. http.listen: 127.0.0.1:9108)"
            )
            assert world.management.api_key not in result.stderr
        assert world.management.count() == 0
