"""`sgpipe webhooks connect` and `check`: SendGrid's side and sgpipe's side made to agree.

``connect`` is idempotent: it reads what SendGrid has, changes only what differs from what
was asked (create the webhook, enable it or its events, turn signing on), and writes the public
key into the config file only when the file does not list it yet -- a second run makes no API
change and leaves the file byte for byte as it was. The file is edited with ruamel.yaml's
round-trip mode, so comments, order and the other webhooks stay as the operator wrote them.

After the set-up, ``connect`` asks SendGrid for a test batch and watches the running ingress's
``sgpipe_ingest_requests_total`` counters for that webhook until one moves or the deadline
passes: ``accepted`` means the batch verified and Kafka acknowledged it.

``check`` compares each webhook sgpipe declares with what SendGrid has on file.
"""

from __future__ import annotations

import asyncio
import io
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from sgpipe.runtime.settings import WebhookSettings
from sgpipe.webhooks.client import WebhooksClient
from sgpipe.webhooks.fields import EVENT_FIELDS
from sgpipe.webhooks.models import (
    EventWebhook,
    EventWebhookRequest,
    EventWebhookTestRequest,
)

INGEST_REQUESTS: Final = "sgpipe_ingest_requests_total"
VERIFICATION_FAILURES: Final = "sgpipe_ingest_verification_failures_total"


# --- the config file -----------------------------------------------------------------------


def trust_key_in_config(path: Path, webhook: str, public_key: str) -> bool:
    """Make ``webhooks[<webhook>].public_keys`` in the YAML file at ``path`` list
    ``public_key``, creating the file or the entry if needed. Returns False, without writing,
    when it already does. Earlier keys stay listed (a rotation needs both for a while)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    document = yaml.load(text) if text.strip() else None
    if document is None:
        document = CommentedMap()
    if not isinstance(document, dict):
        raise ValueError(f"{path} does not hold a mapping at the top level")
    webhooks = document.get("webhooks")
    if webhooks is None:
        webhooks = document["webhooks"] = CommentedSeq()
    if not isinstance(webhooks, list):
        raise ValueError(f"{path}: `webhooks` is not a list")
    entry = next(
        (item for item in webhooks if isinstance(item, dict) and item.get("name") == webhook), None
    )
    if entry is None:
        entry = CommentedMap()
        entry["name"] = webhook
        entry["public_keys"] = CommentedSeq([public_key])
        webhooks.append(entry)
    else:
        keys = entry.get("public_keys")
        if isinstance(keys, str):  # the comma-separated form the settings also accept
            keys = CommentedSeq([part.strip() for part in keys.split(",") if part.strip()])
            entry["public_keys"] = keys
        if keys is None:
            keys = entry["public_keys"] = CommentedSeq()
        if public_key in keys:
            return False
        keys.append(public_key)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    temporary = path.with_name(f".{path.name}.sgpipe-tmp")
    temporary.write_text(buffer.getvalue(), encoding="utf-8")
    if path.exists():
        temporary.chmod(path.stat().st_mode & 0o7777)
    temporary.replace(path)
    return True


def kubernetes_secret(secret_name: str, webhook: str, public_keys: Sequence[str]) -> str:
    """The Secret the Helm chart's ``webhooks[].publicKeysSecret`` reads (keys comma-separated)."""
    keys = ",".join(public_keys)
    return (
        "apiVersion: v1\n"
        "kind: Secret\n"
        "metadata:\n"
        f"  name: {secret_name}\n"
        "type: Opaque\n"
        "stringData:\n"
        f'  {webhook}: "{keys}"\n'
        "# helm values: webhooks: [{name: "
        f"{webhook}, publicKeysSecret: {{name: {secret_name}, key: {webhook}}}}}]\n"
    )


# --- connect -------------------------------------------------------------------------------


@dataclass
class ConnectResult:
    webhook: EventWebhook
    public_key: str
    changes: list[str] = field(default_factory=list)


def desired_request(
    url: str, events: Sequence[str], friendly_name: str | None
) -> EventWebhookRequest:
    toggles = {name: name in events for name in EVENT_FIELDS}
    return EventWebhookRequest.model_validate(
        {"url": url, "enabled": True, **toggles}
        | ({"friendly_name": friendly_name} if friendly_name else {})
    )


async def connect_webhook(
    client: WebhooksClient, url: str, events: Sequence[str], friendly_name: str | None
) -> ConnectResult:
    """Find or create SendGrid's webhook for ``url``, enabled, sending ``events``, signed.
    Only what differs is changed; ``changes`` says what was."""
    existing = next((w for w in (await client.list()).real() if w.url == url), None)
    changes: list[str] = []
    if existing is None:
        webhook = await client.create(desired_request(url, events, friendly_name))
        changes.append(f"created SendGrid webhook {webhook.id} for {url}")
    else:
        webhook = existing
        wrong = [name for name in EVENT_FIELDS if getattr(webhook, name) != (name in events)]
        if not webhook.enabled or wrong:
            # PATCH with the URL (required) and the fields that differ, nothing else.
            fields: dict[str, Any] = {"url": url}
            if not webhook.enabled:
                fields["enabled"] = True
            fields |= {name: name in events for name in wrong}
            webhook = await client.update(webhook.id, EventWebhookRequest.model_validate(fields))
            if "enabled" in fields:
                changes.append(f"enabled SendGrid webhook {webhook.id}")
            if wrong:
                changes.append(f"set the events of {webhook.id}: {', '.join(wrong)}")
    key = (await client.public_key(webhook.id)).public_key
    if not key:
        key = (await client.set_signing(webhook.id, enabled=True)).public_key
        changes.append(f"enabled signature verification on {webhook.id}")
    if not key:
        raise RuntimeError(f"SendGrid returned no public key for webhook {webhook.id}")
    return ConnectResult(webhook, key, changes)


def token_url_for(public_url: str) -> str:
    """The built-in token endpoint beside the webhook URL: ``https://HOST/webhooks/NAME`` ->
    ``https://HOST/oauth/token`` (the ingress serves both)."""
    base, _, _ = public_url.rstrip("/").rpartition("/webhooks/")
    return f"{base}/oauth/token"


@dataclass(frozen=True)
class OAuthSetUp:
    """What ``connect_oauth`` did: a new client (its id and secret, shown once) or nothing."""

    webhook: EventWebhook
    client_id: str | None = None
    client_secret: str | None = None
    secret_hash: str | None = None


async def connect_oauth(
    client: WebhooksClient,
    webhook: EventWebhook,
    token_url: str,
    known_client_ids: Sequence[str],
) -> OAuthSetUp:
    """Make SendGrid authenticate to ``webhook`` with OAuth client credentials from the
    ingress's token endpoint at ``token_url``. Idempotent: when SendGrid already uses a client
    the ingress knows, at that URL, nothing changes. Otherwise a new client is created (its
    secret stored by SendGrid, only its hash by sgpipe) and set on SendGrid's side."""
    if webhook.oauth_client_id in known_client_ids and webhook.oauth_token_url == token_url:
        return OAuthSetUp(webhook)
    from ingest.oauth import hash_client_secret, new_client_credentials

    client_id, secret = new_client_credentials()
    updated = await client.update(
        webhook.id,
        EventWebhookRequest.model_validate(
            {
                "url": webhook.url,
                "oauth_client_id": client_id,
                "oauth_client_secret": secret,
                "oauth_token_url": token_url,
            }
        ),
    )
    return OAuthSetUp(updated, client_id, secret, hash_client_secret(secret))


# --- watching the ingress ------------------------------------------------------------------


def read_outcomes(metrics_url: str, webhook: str, timeout: float = 5.0) -> dict[str, float]:
    """The ingress's request counters for ``webhook`` by outcome, plus verification failures
    as ``unauthorized:<reason>``. Raises OSError when /metrics cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    outcomes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("webhook") != webhook:
                continue
            if sample.name == INGEST_REQUESTS:
                key = sample.labels.get("outcome", "")
            elif sample.name == VERIFICATION_FAILURES:
                key = f"unauthorized:{sample.labels.get('reason', '')}"
            else:
                continue
            outcomes[key] = outcomes.get(key, 0.0) + sample.value
    return outcomes


@dataclass(frozen=True)
class TestOutcome:
    arrived: bool
    accepted: bool
    detail: str


async def watch_test_batch(
    metrics_url: str,
    webhook: str,
    before: Mapping[str, float],
    deadline_seconds: float,
    *,
    read: Callable[[str, str], dict[str, float]] = read_outcomes,
) -> TestOutcome:
    """Until a counter of ``webhook`` moved past ``before``, or the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            now = await asyncio.to_thread(read, metrics_url, webhook)
        except (OSError, urllib.error.URLError) as exc:
            return TestOutcome(
                False, False, f"cannot read the ingress's metrics at {metrics_url}: {exc}"
            )
        moved = {
            outcome: now[outcome] - before.get(outcome, 0.0)
            for outcome in now
            if now[outcome] > before.get(outcome, 0.0)
        }
        if moved.get("accepted"):
            return TestOutcome(
                True, True, "accepted: the signature verified and Kafka acknowledged"
            )
        requests_moved = {k: v for k, v in moved.items() if not k.startswith("unauthorized:")}
        if requests_moved:
            reasons = sorted(k.split(":", 1)[1] for k in moved if k.startswith("unauthorized:"))
            outcome = ", ".join(sorted(requests_moved))
            detail = f"arrived but was not accepted ({outcome}"
            detail += f": {', '.join(reasons)})" if reasons else ")"
            if "unauthorized" in requests_moved:
                detail += (
                    "; the ingress loads public keys at start: restart it (sgpipe up, or the "
                    "ingress Deployment) so that it trusts the key, then run connect again"
                )
            return TestOutcome(True, False, detail)
        if time.monotonic() >= deadline:
            return TestOutcome(
                False,
                False,
                f"no test batch reached the ingress within {deadline_seconds:g} s "
                f"(watched {metrics_url}); does the public URL route to this ingress?",
            )
        await asyncio.sleep(0.25)


async def send_test(client: WebhooksClient, webhook: EventWebhook) -> None:
    await client.test(EventWebhookTestRequest(url=webhook.url, id=webhook.id))


# --- check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookCheck:
    name: str
    expected_url: str | None
    sendgrid_id: str | None
    differences: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expected_url": self.expected_url,
            "sendgrid_id": self.sendgrid_id,
            "ok": self.ok,
            "differences": list(self.differences),
        }


def webhook_name_of(url: str) -> str | None:
    """``NAME`` of a URL whose path is ``/webhooks/NAME`` (what the ingress serves)."""
    parts = urlsplit(url).path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "webhooks" and parts[-1]:
        return parts[-1]
    return None


def check_webhooks(
    declared: Sequence[WebhookSettings],
    on_file: Sequence[EventWebhook],
    public_base_url: str | None,
) -> list[WebhookCheck]:
    """What differs between sgpipe's webhooks and SendGrid's, one entry per webhook of either
    side that points at sgpipe."""
    results: list[WebhookCheck] = []
    base = public_base_url.rstrip("/") if public_base_url else None
    matched: set[str] = set()
    for webhook in declared:
        expected = f"{base}/webhooks/{webhook.name}" if base else None
        candidates = [
            w
            for w in on_file
            if (w.url == expected if expected else webhook_name_of(w.url) == webhook.name)
        ]
        if not candidates and expected:
            # Same name on another host: a stale URL, the most useful thing to report.
            candidates = [w for w in on_file if webhook_name_of(w.url) == webhook.name]
        if not candidates:
            where = expected or f"a URL ending in /webhooks/{webhook.name}"
            results.append(
                WebhookCheck(
                    webhook.name, expected, None, (f"SendGrid has no webhook posting to {where}",)
                )
            )
            continue
        found = candidates[0]
        matched.add(found.id)
        differences: list[str] = []
        if expected and found.url != expected:
            differences.append(f"posts to {found.url}, expected {expected}")
        if not found.enabled:
            differences.append("disabled on SendGrid's side: SendGrid posts nothing")
        if not found.public_key:
            differences.append("signature verification is off on SendGrid's side")
        elif found.public_key not in webhook.public_keys:
            differences.append(
                f"signed with a key sgpipe does not trust (…{found.public_key[-12:]} is not in "
                f"webhooks[{webhook.name}].public_keys)"
            )
        missing = [name for name in EVENT_FIELDS if not getattr(found, name)]
        if missing:
            differences.append(f"does not send events sgpipe stores: {', '.join(missing)}")
        results.append(WebhookCheck(webhook.name, expected, found.id, tuple(differences)))
    declared_names = {webhook.name for webhook in declared}
    for other in on_file:
        name = webhook_name_of(other.url)
        if other.id in matched or name is None or name in declared_names:
            continue
        if base and not other.url.startswith(base + "/"):
            continue
        results.append(
            WebhookCheck(
                name,
                None,
                other.id,
                (f"SendGrid posts to {other.url} but sgpipe declares no webhook {name!r} (404)",),
            )
        )
    return results
