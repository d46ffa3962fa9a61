"""The one place tests get a raw-record HMAC key and sign raw records they produce themselves.

Stages refuse to start without ``raw_auth.keys`` (docs/security.md#raw-records), and the
processor dead-letters raw records without a valid ``sgpipe-raw-hmac``: a test that writes raw
batches straight to a topic signs them here, with the key its settings carry
(``RAW_AUTH_DOCUMENT``, which ``kafka_test_settings`` and the tests' config files include).
"""

from __future__ import annotations

from typing import Any, Final

from schemas.raw_auth import RawAuthKey, sign_raw_record
from schemas.raw_batch import KafkaHeaders, RawBatch, raw_batch_headers

TEST_RAW_AUTH_KEY: Final = RawAuthKey("test-1", b"test-raw-auth-secret-0123456789abcdef")
# The `raw_auth` section of a test configuration, as a document (YAML, JSON, model_validate).
RAW_AUTH_DOCUMENT: Final[dict[str, Any]] = {
    "keys": [{"id": TEST_RAW_AUTH_KEY.key_id, "secret": TEST_RAW_AUTH_KEY.secret.decode()}]
}


def signed_raw_batch_headers(batch: RawBatch, key: RawAuthKey = TEST_RAW_AUTH_KEY) -> KafkaHeaders:
    """``raw_batch_headers(batch)`` with the HMAC the ingress would add under ``key``."""
    return sign_raw_record(key, batch.body, raw_batch_headers(batch))
