"""Splitting a SendGrid body into its elements' exact bytes: msgspec's fast path, the structural
scanner it falls back to, and judging each element on its own."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.errors import InvalidBatch, InvalidEvent
from processors.split import parse_element, scan_elements, split_elements


def test_sendgrid_body_splits_into_exact_spans() -> None:
    body = b'[{"a":1,"b":"x"},\r\n{ "c" : [1, 2] },\r\n"s",\r\n3]\r\n'
    assert split_elements(body) == [b'{"a":1,"b":"x"}', b'{ "c" : [1, 2] }', b'"s"', b"3"]
    assert scan_elements(body) == split_elements(body)


@pytest.mark.hostile("elements")
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b'{"a":"\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"a":NaN}', id="nan"),
        pytest.param(b'{"a":"x\x01y"}', id="control-character"),
        pytest.param(b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}", id="deep"),
        pytest.param(b'{"a":[1,2}', id="unbalanced-inside"),
        pytest.param(b'{"a" 1}', id="missing-colon"),
    ],
)
def test_a_malformed_element_does_not_hide_its_neighbours(bad: bytes) -> None:
    body = b'[{"ok":1},\r\n' + bad + b',\r\n{"ok":"2,]}"}]\r\n'
    if bad == b'{"a":[1,2}':
        # A mismatched bracket breaks the outer structure: no span can be trusted.
        with pytest.raises(InvalidBatch) as caught:
            split_elements(body)
        assert caught.value.reason == "invalid_json"
        return
    elements = split_elements(body)
    assert elements == [b'{"ok":1}', bad, b'{"ok":"2,]}"}']
    with pytest.raises(InvalidEvent) as rejected:
        parse_element(bad)
    assert rejected.value.reason == "invalid_element"
    assert parse_element(elements[2]) == ({"ok": "2,]}"}, '{"ok":"2,]}"}')


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"[]", [], id="empty"),
        pytest.param(b" \r\n[ \r\n ]\r\n", [], id="empty-spaced"),
        pytest.param(b'\xef\xbb\xbf[{"a":1}]', [b'{"a":1}'], id="utf8-bom"),
        pytest.param(b'[{"a":"\\"]},"}]', [b'{"a":"\\"]},"}'], id="escaped-quote"),
        pytest.param(b'[{"a":"\\\\"},{"b":2}]', [b'{"a":"\\\\"}', b'{"b":2}'], id="backslash"),
    ],
)
def test_split_edge_cases(body: bytes, expected: list[bytes]) -> None:
    assert split_elements(body) == expected
    assert scan_elements(body.removeprefix(b"\xef\xbb\xbf")) == expected


@pytest.mark.hostile("elements")
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"", "invalid_json", id="empty-body"),
        pytest.param(b"{}", "not_an_array", id="object"),
        pytest.param(b"[1,,2]", "invalid_json", id="empty-element"),
        pytest.param(b"[1] [2]", "invalid_json", id="two-arrays"),
        pytest.param(b'["a]', "invalid_json", id="unterminated-string"),
        pytest.param(b"[{]}", "invalid_json", id="mismatched"),
        pytest.param(b"[1}", "invalid_json", id="top-level-brace"),
        pytest.param(b"[1", "invalid_json", id="unclosed"),
    ],
)
def test_broken_outer_structure_is_an_invalid_batch(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidBatch) as caught:
        split_elements(body)
    assert caught.value.reason == reason


def test_parse_element_types_and_text() -> None:
    assert parse_element(b'{"k":"caf\\u00e9"}') == ({"k": "café"}, '{"k":"caf\\u00e9"}')
    with pytest.raises(InvalidEvent) as caught:
        parse_element(b"[1]")
    assert (caught.value.reason, caught.value.detail) == (
        "not_an_object",
        "events are JSON objects; got array",
    )


# --- properties ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=10,
)
spacing = st.sampled_from([b"", b" ", b"\r\n", b"\t", b" \r\n  "])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(json_values, spacing, spacing), max_size=6), spacing)
def test_scanner_finds_the_same_spans_as_msgspec(
    items: list[tuple[Any, bytes, bytes]], trailing: bytes
) -> None:
    encoded = [json.dumps(value).encode() for value, _, _ in items]
    body = b"[" + b",".join(b + e + a for e, (_, b, a) in zip(encoded, items, strict=True))
    body += b"]" + trailing
    fast = [bytes(span) for span in msgspec.json.decode(body, type=list[msgspec.Raw])]
    assert fast == encoded
    assert scan_elements(body) == encoded
    assert split_elements(body) == encoded


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80) | st.builds(lambda b: b"[" + b + b"]", st.binary(max_size=60)))
def test_arbitrary_bytes_split_or_raise_invalid_batch(body: bytes) -> None:
    try:
        elements = split_elements(body)
    except InvalidBatch as exc:
        assert exc.reason in {"invalid_json", "not_an_array"}
        return
    for element in elements:
        assert element and element in body
        try:
            parse_element(element)
        except InvalidEvent as exc:
            assert exc.reason in {"invalid_element", "not_an_object"}
