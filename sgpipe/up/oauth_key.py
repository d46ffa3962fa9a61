"""The token endpoint's signing key of one `sgpipe up` data dir.

A webhook with ``oauth_clients`` needs ``ingest.oauth_signing_keys``; when the configuration
gives none, `sgpipe up` generates one into the data dir (mode 0600) on first start and reuses it
after, so that tokens SendGrid cached survive a restart. Every stage child reads it from the
file (``ingest.oauth_signing_key_files``), never from process memory.
"""

from __future__ import annotations

from pathlib import Path

from sgpipe.runtime.settings import Settings
from sgpipe.up.layout import write_private_file

OAUTH_SIGNING_KEY_FILE = "oauth-signing-key.pem"


def with_oauth_signing_key(settings: Settings, data_dir: Path) -> Settings:
    """``settings`` with the data dir's signing key when a webhook has built-in clients and
    the configuration names no key; unchanged otherwise."""
    ingest = settings.ingest
    needs_key = any(webhook.oauth_clients for webhook in settings.webhooks)
    if not needs_key or ingest.oauth_signing_key_files or ingest.oauth_signing_keys:
        return settings
    from ingest.oauth import generate_signing_key_pem

    path = data_dir / OAUTH_SIGNING_KEY_FILE
    if not path.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(path, generate_signing_key_pem())
    updated = ingest.model_copy(update={"oauth_signing_key_files": (path.resolve(),)})
    return settings.model_copy(update={"ingest": updated})
