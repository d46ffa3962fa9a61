"""The SendGrid simulator: realistic Event Webhook traffic, batched, signed and retried the way
SendGrid does it. The demo (``sgpipe up --demo``), the load generator (``sgpipe simulate``,
``bench/``) and the end-to-end tests all drive it through ``simulate``:

    summary = await simulate(SimulationOptions(url=..., private_key=load_private_key(path)))
    assert summary.ok

Layout: ``events`` (message lifecycles -> event JSON), ``batches`` (events -> POST bodies, with
duplicates), ``keys`` (the signing key pair), ``oauth`` (client credentials), ``simulation``
(pacing, sending, retries, the summary), ``command`` (the CLI).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgpipe.simulator.keys import (
        KeyFileError,
        generate_private_key,
        load_private_key,
        public_key_base64,
        sign,
        write_private_key,
    )
    from sgpipe.simulator.oauth import OAuthClientSettings
    from sgpipe.simulator.simulation import (
        SimulationOptions,
        SimulationProgress,
        SimulationSummary,
        simulate,
    )

# Loaded on first use (PEP 562): the CLI registers `simulate` through this package, and every
# other command would otherwise pay for importing aiohttp and cryptography.
_EXPORTS = {
    "KeyFileError": "keys",
    "generate_private_key": "keys",
    "load_private_key": "keys",
    "public_key_base64": "keys",
    "sign": "keys",
    "write_private_key": "keys",
    "OAuthClientSettings": "oauth",
    "SimulationOptions": "simulation",
    "SimulationProgress": "simulation",
    "SimulationSummary": "simulation",
    "simulate": "simulation",
}

__all__ = [
    "KeyFileError",
    "OAuthClientSettings",
    "SimulationOptions",
    "SimulationProgress",
    "SimulationSummary",
    "generate_private_key",
    "load_private_key",
    "public_key_base64",
    "sign",
    "simulate",
    "write_private_key",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
