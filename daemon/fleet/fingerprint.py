"""The settings every host sharing one database must run alike.

The fingerprint is a SHA-256 over canonical JSON of what decides which
commands are journaled and where they go: every server's name, platform,
site, host and port, and `products` (the ignored ones included). Never a
secret: passwords, tokens and keys are left out, so it can be stored and
shown. Messages show it shortened (`short`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from daemon.config import IGNORE, Settings

SHOWN = 12  # hex digits in messages


def fingerprint(settings: Settings) -> str:
    servers = {
        name: {"platform": s.platform, "site": s.site, "host": s.host, "port": s.port}
        for name, s in settings.servers.items()
    }
    products: dict[str, Any] = {
        slug: product.model_dump(mode="json") for slug, product in settings.products.items()
    }
    products.update(dict.fromkeys(settings.ignored_products, IGNORE))
    text = json.dumps(
        {"servers": servers, "products": products},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def short(value: str) -> str:
    return value[:SHOWN]
