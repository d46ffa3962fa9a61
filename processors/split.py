"""1 -> N: a raw SendGrid body into its elements' exact bytes, each parsed on its own.

SendGrid posts a JSON array. The body is first cut into the byte spans of its elements, without
building them, so that:

- one pathological element (nested too deeply, a number out of range, a lone surrogate, bytes
  that are not UTF-8) dead-letters alone while the rest of its batch goes on;
- ``raw`` can keep each element exactly as SendGrid sent it (no re-encoding: ``1e400`` stays
  ``1e400``, duplicate keys stay duplicated, and the processor saves the encoding time).

msgspec finds the spans of a well-formed body (``list[msgspec.Raw]``). It refuses the whole
body when one element is malformed (a lone surrogate, NaN, a control character, nesting past
its depth limit); then a structural scanner that never recurses and does not judge what is
inside an element finds the spans instead. Only a body whose outer structure is not a JSON
array is a dead letter as a whole.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from processors.errors import InvalidBatch, InvalidEvent

_UTF8_BOM = b"\xef\xbb\xbf"
_WHITESPACE = b" \t\r\n"
# Characters that change the structure; everything else inside an element is skipped.
_STRUCTURAL = re.compile(rb'["\[\]{},]')
# The rest of a string after its opening quote: escapes skipped, up to the closing quote.
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)
_CLOSERS = {ord("["): ord("]"), ord("{"): ord("}")}

_decode_element = msgspec.json.Decoder().decode
_decode_spans = msgspec.json.Decoder(list[msgspec.Raw]).decode


def split_elements(body: bytes) -> list[bytes]:
    """The exact bytes of each element of the JSON array ``body``, in order.

    InvalidBatch when the body is not a JSON array (``invalid_json``, ``not_an_array``).
    Elements are not judged here (see ``parse_element``).
    """
    if body.startswith(_UTF8_BOM):  # RFC 8259 lets a parser ignore it; json.loads did
        body = body[len(_UTF8_BOM) :]
    try:
        return [bytes(span) for span in _decode_spans(body)]
    except msgspec.ValidationError as exc:
        # Well-formed JSON, but not an array.
        raise InvalidBatch("not_an_array", f"SendGrid posts a JSON array; {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, msgspec.DecodeError) else "nesting too deep"
    return scan_elements(body, reason)


def scan_elements(body: bytes, parse_error: str = "") -> list[bytes]:
    """The element spans of a JSON array, found from its structure alone: brackets, braces,
    strings and the commas between elements. What lies inside an element is left for
    ``parse_element`` to judge. InvalidBatch if the outer structure is broken."""

    def broken(why: str) -> InvalidBatch:
        detail = f"the body is not a JSON array: {why}"
        return InvalidBatch("invalid_json", f"{detail} ({parse_error})" if parse_error else detail)

    position = _skip_whitespace(body, 0)
    if position == len(body) or body[position] != ord("["):
        raise broken("it does not start with [")
    spans: list[bytes] = []
    start = position + 1
    expected: list[int] = []  # closers of the brackets open inside the current element
    search_from = start
    while True:
        match = _STRUCTURAL.search(body, search_from)
        if match is None:
            raise broken("the array is not closed")
        at = match.start()
        char = body[at]
        search_from = at + 1
        if char == ord('"'):
            rest = _STRING_REST.match(body, at + 1)
            if rest is None:
                raise broken(f"a string at byte {at} is not closed")
            search_from = rest.end()
        elif char in _CLOSERS:
            expected.append(_CLOSERS[char])
        elif expected and char in (ord("]"), ord("}")):
            if expected.pop() != char:
                raise broken(f"mismatched {chr(char)} at byte {at}")
        elif expected:  # a comma inside an element
            continue
        elif char == ord(","):
            spans.append(_element(body, start, at, broken))
            start = at + 1
        elif char == ord("]"):
            if spans or body[start:at].strip(_WHITESPACE):
                spans.append(_element(body, start, at, broken))
            if _skip_whitespace(body, at + 1) != len(body):
                raise broken(f"unexpected bytes after the array at byte {at + 1}")
            return spans
        else:  # "}" at the top level
            raise broken(f"unexpected }} at byte {at}")


def _element(body: bytes, start: int, end: int, broken: Any) -> bytes:
    span = body[start:end].strip(_WHITESPACE)
    if not span:
        raise broken(f"an empty element at byte {start}")
    return span


def _skip_whitespace(body: bytes, position: int) -> int:
    while position < len(body) and body[position] in _WHITESPACE:
        position += 1
    return position


def parse_element(element: bytes) -> tuple[dict[str, Any], str]:
    """The event object and its exact text. InvalidEvent when the element is not one:
    ``not_an_object`` (valid JSON of another type) or ``invalid_element`` (not valid JSON on
    its own, not UTF-8, a number out of range, nested too deeply)."""
    try:
        item = _decode_element(element)
        # msgspec checks the UTF-8 of strings; this also covers bytes outside them, and is
        # the text `raw` keeps (valid UTF-8, so encoding it again gives the same bytes).
        text = element.decode("utf-8")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidEvent("invalid_element", f"the element is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidEvent("invalid_element", "the element nests JSON too deeply") from None
    if not isinstance(item, dict):
        raise InvalidEvent("not_an_object", f"events are JSON objects; got {_json_type(item)}")
    return item, text


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else type(value).__name__
