"""1 -> N: a raw SendGrid body into its event objects."""

from __future__ import annotations

import json
from typing import Any

from processors.errors import InvalidBatch


def split_batch(body: bytes) -> list[Any]:
    """The items of the JSON array SendGrid posted; InvalidBatch if the body is not one.

    Items are returned as parsed, whatever their type: judging each is normalization's job,
    so that one bad item dead-letters alone instead of taking its batch with it.
    """
    try:
        document = json.loads(body)
    except RecursionError as exc:
        raise InvalidBatch("json_too_deep", "the body nests JSON too deeply to parse") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidBatch("invalid_json", f"the body is not JSON: {exc}") from exc
    if not isinstance(document, list):
        raise InvalidBatch(
            "not_an_array", f"SendGrid posts a JSON array; got {type(document).__name__}"
        )
    return document
