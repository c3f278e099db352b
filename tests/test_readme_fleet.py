"""The README's two-site example ("Several hosts") is a valid config for a host
of either site, as written: each reads only its own site's RCON passwords,
delivers only to its own site's servers, and both share one fingerprint."""

from __future__ import annotations

import re
from pathlib import Path

from daemon.config import Settings, load_settings
from daemon.fleet.fingerprint import fingerprint
from tests.fakes.world import REPO

SECRETS = ("paynow_api_key", "paynow_webhook_secret", "state_db_password")


def two_site_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**A two-site example.**") :]
    found = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    assert found is not None, "no yaml block after **A two-site example.**"
    return found[1]


def host_of(tmp_path: Path, site: str, servers: tuple[str, ...]) -> Settings:
    """The example as the README says a host of `site` runs it, with the
    credential files such a host has (its own site's RCON passwords only)."""
    folder = tmp_path / site
    credentials = folder / "credentials"
    credentials.mkdir(parents=True)
    for name in (*SECRETS, *(f"rcon_{server}" for server in servers)):
        (credentials / f"perksync_{name}").write_text(f"{name}-SECRET\n")
    text = two_site_example()
    if site != "eu":
        text, swapped = re.subn(r"^(  site:) eu\b", rf"\1 {site}", text, flags=re.MULTILINE)
        assert swapped == 1, "the example's sync.site: eu line"
    path = folder / "config.yaml"
    path.write_text(text)
    return load_settings(path, env={"CREDENTIALS_DIRECTORY": str(credentials)})


def test_the_two_site_example_validates_for_a_host_of_each_site(tmp_path: Path) -> None:
    eu = host_of(tmp_path, "eu", ("lobby", "survival"))
    us = host_of(tmp_path, "us", ("arena",))
    assert (eu.sync.site, eu.own_servers) == ("eu", ["lobby", "survival"])
    assert (us.sync.site, us.own_servers) == ("us", ["arena"])
    assert eu.state_db_postgres and eu.state_db_password == "state_db_password-SECRET"
    assert us.servers["arena"].secret.get_secret_value() == "rcon_arena-SECRET"
    assert fingerprint(eu) == fingerprint(us)  # one fleet
