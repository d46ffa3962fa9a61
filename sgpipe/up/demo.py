"""`sgpipe up --demo`: the pipeline with simulated SendGrid traffic, to watch rows arrive.

A P-256 key is generated into ``<data-dir>/demo-key.pem`` (0600, reused by later demos; never
anywhere in the repository) and its public key is trusted by the ``demo`` webhook (added to the
config's ``demo`` webhook, or a ``demo`` webhook is added). Once the ingress listens, the
simulator (``sgpipe.simulator``, the same code as ``sgpipe simulate``) posts signed,
SendGrid-shaped batches at ``DEMO_RATE`` events per second until `sgpipe up` stops.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from sgpipe.runtime.settings import Settings, WebhookSettings
from sgpipe.up.layout import DEMO_KEY_FILE

log = structlog.get_logger(__name__)

DEMO_WEBHOOK = "demo"
DEMO_RATE = 20.0  # events per second: a batch a second, rows visible within seconds
DEMO_QUERY = (
    "SELECT event, count() AS events FROM email_events FINAL GROUP BY event ORDER BY events DESC"
)
_PROGRESS_SECONDS = 30.0


def demo_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The data dir's demo key, generated on first use."""
    from sgpipe.simulator import generate_private_key, load_private_key, write_private_key

    path = data_dir / DEMO_KEY_FILE
    if path.exists():
        return load_private_key(path)
    key = generate_private_key()
    write_private_key(key, path)
    return key


def with_demo_webhook(settings: Settings, key: ec.EllipticCurvePrivateKey) -> Settings:
    """``settings`` whose ``demo`` webhook also trusts ``key`` (added if the config has none)."""
    from sgpipe.simulator import public_key_base64

    public_key = public_key_base64(key)
    webhooks = list(settings.webhooks)
    for index, webhook in enumerate(webhooks):
        if webhook.name == DEMO_WEBHOOK:
            if public_key not in webhook.public_keys:
                keys = (*webhook.public_keys, public_key)
                webhooks[index] = webhook.model_copy(update={"public_keys": keys})
            break
    else:
        webhooks.append(WebhookSettings(name=DEMO_WEBHOOK, public_keys=(public_key,)))
    return settings.model_copy(update={"webhooks": tuple(webhooks)})


def query_command(program: str, data_dir: Path, config_file: Path | None) -> str:
    """The `sgpipe query` command line that shows the demo's rows, as the user would type it."""
    words = [program, "query"]
    if config_file is not None:
        words += ["--config", str(config_file)]
    words += ["--data-dir", str(data_dir), DEMO_QUERY]
    return shlex.join(words)


async def run_demo(url: str, key: ec.EllipticCurvePrivateKey, stop: asyncio.Event) -> None:
    """Post simulated events to ``url`` until ``stop`` is set; logs progress now and then."""
    from sgpipe.simulator import SimulationOptions, SimulationProgress, simulate

    def progress(state: SimulationProgress) -> None:
        log.info(
            "demo traffic",
            events_sent=state.events_sent,
            events_acknowledged=state.events_acknowledged,
            retries=state.retries,
        )

    options = SimulationOptions(
        url=url,
        private_key=key,
        events=None,
        rate=DEMO_RATE,
        # A stop of `sgpipe up` should not wait on demo posts for long.
        retry_for_seconds=30.0,
        request_timeout_seconds=10.0,
    )
    summary = await simulate(
        options, stop=stop, on_progress=progress, progress_interval_seconds=_PROGRESS_SECONDS
    )
    log.info(
        "demo traffic stopped",
        events=summary.events,
        events_accepted=summary.events_accepted,
        duplicate_events=summary.duplicate_events,
    )
