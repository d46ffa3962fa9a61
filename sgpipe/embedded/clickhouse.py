"""Embedded ClickHouse: one chdb engine, served over ClickHouse's HTTP interface.

chdb runs the real ClickHouse engine in-process, but only one process may hold a data path
(a second one gets "Cannot lock file .../status"). So exactly one process owns the store: it
opens the chdb session and serves the subset of ClickHouse's HTTP interface that
clickhouse-connect and BI tools use. Everything else -- the pipeline's sink, `sgpipe query`,
a BI tool -- talks to that endpoint through ClickHouse's normal protocol, the same code path it
uses against a real server. `query_tsv` is the one exception, for when nobody is serving the
store and the caller can open it directly.

Who may do what (docs/security.md has the threat model):

* Every query needs credentials (`sgpipe.embedded.credentials`): HTTP Basic, the
  `X-ClickHouse-User`/`X-ClickHouse-Key` headers or the `user`/`password` parameters, as
  ClickHouse takes them, compared in constant time; otherwise 516 AUTHENTICATION_FAILED.
  The reader user's requests, and every GET, run with `readonly = 2`, set before anything of
  the client's (a `readonly=0` in such a request is refused).
* Browser requests are refused (403) before anything else: a foreign `Origin` (any not in
  the allowed list, which is empty by default), a cross-site `Sec-Fetch-Site`, and, when
  serving on loopback, a `Host` that is not a loopback name (DNS rebinding). No CORS headers.
* The engine starts with sgpipe's access control (`clickhouse_policy`), and every statement
  is parsed by the engine into its syntax tree, the tree checked (`check_statement`), and the
  engine's canonical text of that tree run. A statement's text is capped
  (`embedded.clickhouse_max_query_bytes`, 413 beyond); streamed insert rows are not.

How a request runs:

* An owner connection keeps the engine (and the lock on the data path) alive for the
  server's lifetime. Each request opens its own short-lived connection handle to that engine
  (about 0.2 ms). Handles are how chdb isolates `USE`/`SET` state, so every request gets a
  fresh context exactly like a real server request without `session_id`: URL settings, the
  `database` parameter, or a `SET` sent by one client never leak into the next. Handles also
  run in parallel, where queries through one shared handle would serialize.
* chdb calls block, so they run on a small thread pool owned by the app, never on the loop.
* `INSERT ... FORMAT <fmt>` bodies are streamed into chdb's streaming insert
  (`Connection.send_insert`), the API that takes binary input such as clickhouse-connect's
  Native blocks, so an insert of any size uses bounded memory.
* Other statements are read whole and run with `Connection.query`; their result is
  materialised before the response starts, so a failure is always a proper HTTP error with
  `X-ClickHouse-Exception-Code` and the summary header is complete. That suits the pipeline's
  and an operator's queries; it is not meant for dumping a huge table in one request.
* Responses are never compressed: that is always allowed (the server decides), and on
  loopback compression only costs CPU. Request bodies may be compressed: aiohttp decodes
  gzip/deflate/br/zstd itself, `lz4` (clickhouse-connect's default) is decoded here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import pathlib
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeVar

import lz4.frame
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sgpipe.embedded.clickhouse_policy import (
    ACCESS_DENIED,
    CANONICAL_QUERY,
    LOCKDOWN_PROBE,
    STATEMENT_TREE_QUERY,
    Statement,
    StatementDenied,
    StatementPolicy,
    check_statement,
    escape_query_parameter,
    is_not_serializable,
    unlocked_settings_query,
    write_engine_config,
)
from sgpipe.embedded.credentials import EmbeddedCredentials, EmbeddedUser

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# ClickHouse error codes this module raises itself (src/Common/ErrorCodes.cpp).
_SYNTAX_ERROR: Final = 62
_NOT_IMPLEMENTED: Final = 48
_CANNOT_DECOMPRESS: Final = 271
_AUTHENTICATION_FAILED: Final = 516
_READONLY: Final = 164
_QUERY_IS_TOO_LARGE: Final = 393
_STD_EXCEPTION: Final = 1001

_DEFAULT_FORMAT: Final = "TabSeparated"
_WORKERS: Final = 8  # concurrent chdb calls; ClickHouse parallelises each query itself
_READ_BYTES: Final = 256 * 1024
_APPEND_BYTES: Final = 1024 * 1024  # batch network chunks before each hop to a chdb thread
_HEAD_SCAN_BYTES: Final = 1024 * 1024  # ClickHouse's own max_query_size is 256 KiB
# The default cap on a statement's text (URL `query`, body and multipart form together; not
# the rows of an `INSERT ... FORMAT`, which are streamed). It is held in memory and copied into
# the engine's parser a few times over: uncapped, a 100 MB body grew the process by 3.4 GB.
# ClickHouse's own parser stops at `max_query_size` (256 KiB by default) anyway.
MAX_QUERY_BYTES: Final = 1024 * 1024

# URL parameters the HTTP layer itself consumes (or ClickHouse features not provided here)
# and that must not become `SET` statements. `database` and `default_format` are also
# settings in system.settings, which is why they are listed.
_NOT_SETTINGS: Final = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "user",
        "password",
        "quota_key",
        "role",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "stacktrace",
        "compress",
        "decompress",
    }
)

# exceptionCodeToHTTPStatus in ClickHouse (src/Server/HTTP), by error name.
_BAD_REQUEST_ERRORS: Final = frozenset(
    {
        "BAD_ARGUMENTS",
        "CANNOT_COMPILE_REGEXP",
        "DUPLICATE_COLUMN",
        "ILLEGAL_COLUMN",
        "INCORRECT_DATA",
        "SYNTAX_ERROR",
        "THERE_IS_NO_COLUMN",
        "TOO_BIG_AST",
        "TOO_DEEP_AST",
        "TYPE_MISMATCH",
        "UNEXPECTED_AST_STRUCTURE",
        "UNKNOWN_ELEMENT_IN_AST",
        "UNKNOWN_TYPE_OF_AST_NODE",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    }
)
_NOT_FOUND_ERRORS: Final = frozenset(
    {
        "UNKNOWN_AGGREGATE_FUNCTION",
        "UNKNOWN_DATABASE",
        "UNKNOWN_DATABASE_ENGINE",
        "UNKNOWN_DIRECTION_OF_SORTING",
        "UNKNOWN_FORMAT",
        "UNKNOWN_FUNCTION",
        "UNKNOWN_IDENTIFIER",
        "UNKNOWN_ROLE",
        "UNKNOWN_SETTING",
        "UNKNOWN_STORAGE",
        "UNKNOWN_TABLE",
        "UNKNOWN_TYPE",
        "UNKNOWN_TYPE_OF_QUERY",
    }
)
# An INSERT whose data is not a FORMAT payload in the body: the engine parses it whole.
# (`VALUES` data is a payload too: in format Values, so that it is never parsed as SQL.)
_INSERT_WITHOUT_PAYLOAD: Final = frozenset({b"SELECT", b"WITH", b"INFILE"})
# The part of an error from the canonical-form call that only names that call.
_CANONICAL_SCOPE = re.compile(
    r": In scope (?:SELECT formatQuerySingleLine|WITH parseQueryToJSON)\(.*\)"
    r"(\.\s*\([A-Z0-9_]+\)(?:\s*\(version [^)]*\))?\s*)$",
    re.DOTALL,
)

_ERROR_CODE = re.compile(r"^Code: (\d+)\.")
# "... (UNKNOWN_TABLE)" or "... (UNKNOWN_TABLE) (version 26.9.2.1)" at the end of the text
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]*)\)(?:\s*\(version [^)]*\))?\s*$")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# One SQL token. Comments, quoted strings and quoted identifiers are single tokens, so the
# keyword scans below never look inside them; `\Z` lets a token run to the end of a partial
# buffer (the caller then waits for more bytes).
_TOKEN = re.compile(
    rb"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*(?:\n|\Z) | \#[^\n]*(?:\n|\Z) | /\*.*?(?:\*/|\Z))
    | (?P<quoted>'(?:[^'\\]|\\.|'')*(?:'|\Z) | "(?:[^"\\]|\\.|"")*(?:"|\Z)
                 | `(?:[^`\\]|\\.|``)*(?:`|\Z))
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<open>\()
    | (?P<close>\))
    | (?P<other>[^\s'"`\#/\-A-Za-z_()]+|[/\-])
    """,
    re.VERBOSE | re.DOTALL,
)
# After the FORMAT keyword: the format name, then ClickHouse's rule for where inline data
# starts -- after the first newline if there is one, else after the blanks.
_FORMAT_NAME = re.compile(rb"\s+([A-Za-z_][A-Za-z0-9_]*)[ \t\f]*(?:\r?\n)?")


class LockdownError(RuntimeError):
    """The engine did not start with sgpipe's access control; nothing is served."""


class EmbeddedQueryError(Exception):
    """A query failed in the embedded engine; the message is ClickHouse's error text."""

    def __init__(self, message: str, code: int = _STD_EXCEPTION) -> None:
        super().__init__(message)
        self.code = code


# --- the typed slice of chdb this module uses -------------------------------------------------


class _Result(Protocol):
    def bytes(self) -> bytes: ...
    def rows_read(self) -> int: ...
    def bytes_read(self) -> int: ...
    def storage_rows_read(self) -> int: ...
    def storage_bytes_read(self) -> int: ...
    def rows_written(self) -> int: ...
    def bytes_written(self) -> int: ...
    def elapsed(self) -> float: ...


class _InsertResult(Protocol):
    rows_written: int
    bytes_written: int
    elapsed: float


class _Inserter(Protocol):
    def append(self, data: bytes) -> None: ...
    def finish(self) -> _InsertResult: ...
    def cancel(self) -> None: ...


class _Connection(Protocol):
    def query(self, query: str, format: str = ..., params: Any = ...) -> Any: ...
    def send_insert(self, query: str, format: str = ...) -> _Inserter: ...
    def close(self) -> None: ...


def _connect(conn_str: str) -> _Connection:
    # Imported here: `import chdb` costs ~0.4 s and ~270 MB, which HTTP-only users of this
    # module (e.g. `sgpipe query` against a served store) should not pay.
    connect = _import_chdb_connect()
    conn: _Connection = connect(conn_str)
    return conn


def _import_chdb_connect() -> Any:
    """``chdb.state.connect``, imported with pyarrow hidden: chdb.state imports it (optional
    there; chdb's package requires it) for Arrow APIs this module never calls
    (``record_batch``, DataFrames): ~0.15 s of CPU at every engine start. Hidden only during
    that import: a later ``import pyarrow`` works as usual."""
    if "chdb.state" in sys.modules or "pyarrow" in sys.modules:
        from chdb.state import connect
    else:
        sys.modules["pyarrow"] = None  # type: ignore[assignment]  # `import pyarrow` fails
        try:
            from chdb.state import connect
        finally:
            del sys.modules["pyarrow"]
    return connect


# --- errors --------------------------------------------------------------------------------


# chdb's `default` database overlays the file system (`SELECT * FROM default.`/etc/hosts``),
# so every table look-up in it needs READ ON FILE, which no user here has.
_DEFAULT_DATABASE_HINT: Final = (
    " Note: in the embedded store the `default` database also exposes the file system and "
    "cannot be used for tables; use a database of your own (sgpipe uses clickhouse.database)"
)


def _engine_error(exc: BaseException) -> EmbeddedQueryError:
    """ClickHouse's text from a chdb exception (chdb may prefix it, e.g. "Streaming insert
    finish failed: Code: 27. ...")."""
    text = str(exc).strip()
    start = text.find("Code: ")
    if start >= 0:
        text = text[start:]
        if "grant READ ON FILE" in text:
            text = _ERROR_NAME.sub(lambda name: _DEFAULT_DATABASE_HINT + " " + name[0], text)
        match = _ERROR_CODE.match(text)
        if match:
            return EmbeddedQueryError(text, int(match.group(1)))
    return _clickhouse_error(_STD_EXCEPTION, "STD_EXCEPTION", text or type(exc).__name__)


def _clickhouse_error(code: int, name: str, message: str) -> EmbeddedQueryError:
    return EmbeddedQueryError(f"Code: {code}. DB::Exception: {message}. ({name})", code)


def _http_status(error: EmbeddedQueryError) -> int:
    match = _ERROR_NAME.search(str(error))
    name = match.group(1) if match else ""
    if name in _BAD_REQUEST_ERRORS or name.startswith("CANNOT_PARSE_"):
        return 400
    if name in _NOT_FOUND_ERRORS:
        return 404
    if name == "NOT_IMPLEMENTED":
        return 501
    if name in ("ACCESS_DENIED", "AUTHENTICATION_FAILED"):
        return 403
    if name == "QUERY_IS_TOO_LARGE":
        return 413
    return 500


# --- SQL scanning ----------------------------------------------------------------------------
# Only where an INSERT's inline rows start, so that they are streamed as data and never parsed
# as SQL: the engine does not say it (parseQueryToJSON refuses inline data, chdb's streaming
# insert takes the head and the rows apart). It decides nothing about what may run: the head
# it finds is parsed and checked by the engine's syntax tree like any statement, and its
# FORMAT must be the one the tree reports.


def _tokens(buf: bytes) -> Iterator[re.Match[bytes] | None]:
    """Tokens of `buf` from the start; yields None where nothing matches (e.g. a trailing
    backslash in a partial buffer)."""
    pos = 0
    while pos < len(buf):
        match = _TOKEN.match(buf, pos)
        yield match
        if match is None:
            return
        pos = match.end()


@dataclass(frozen=True, slots=True)
class _InsertHead:
    sql: bytes  # the INSERT statement up to (without) its FORMAT clause
    fmt: str
    data_start: int


_Plain = Literal["plain"]


def _scan_insert(buf: bytes, final: bool) -> _InsertHead | _Plain | None:
    """Is `buf` an `INSERT ... FORMAT <fmt>` with the data following it?

    Returns the head, "plain" for any other statement (run whole by the engine), or None
    when `buf` ends before that can be told and more bytes should be read first.
    """
    depth = 0
    first = True
    previous = b""
    for match in _tokens(buf):
        if match is None or (match.end() == len(buf) and not final):
            return "plain" if final else None
        kind, text = match.lastgroup, match.group()
        if kind == "word":
            word = text.upper()
            if first and word != b"INSERT":
                return "plain"
            first = False
            if depth == 0 and word in _INSERT_WITHOUT_PAYLOAD:
                return "plain"
            if depth == 0 and word == b"VALUES" and previous not in (b"INTO", b"TABLE", b"."):
                # The rows follow the keyword, as data in format Values.
                return _InsertHead(buf[: match.start()], "Values", match.end())
            # FORMAT right after INTO/TABLE or a dot is a table named "format".
            if depth == 0 and word == b"FORMAT" and previous not in (b"INTO", b"TABLE", b"."):
                name = _FORMAT_NAME.match(buf, match.end())
                if name is not None:
                    if name.end() == len(buf) and not final:
                        return None
                    return _InsertHead(buf[: match.start()], name.group(1).decode(), name.end())
        elif kind == "open":
            depth += 1
        elif kind == "close":
            depth -= 1
        if kind not in ("space", "comment"):
            previous = text.upper()
    return "plain" if final else None


def _content_type(fmt: str) -> str:
    if fmt.startswith(("TabSeparated", "TSV")):
        return "text/tab-separated-values; charset=UTF-8"
    if fmt.startswith("JSON"):
        return "application/json; charset=UTF-8"
    if fmt.startswith("CSV"):
        return "text/csv; charset=UTF-8"
    if fmt.startswith(("Native", "RowBinary", "Parquet", "Arrow", "ORC", "Avro", "MsgPack")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


# --- request bodies ------------------------------------------------------------------------


class _Lz4Frames:
    """Decodes concatenated LZ4 frames: clickhouse-connect compresses each insert block as its
    own frame (ClickHouse's `Content-Encoding: lz4` is the LZ4 frame format)."""

    def __init__(self) -> None:
        self._frame = lz4.frame.LZ4FrameDecompressor()
        self._in_frame = False

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            try:
                out.append(self._frame.decompress(data))
            except RuntimeError as exc:
                raise _clickhouse_error(_CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", str(exc)) from exc
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            data = self._frame.unused_data or b""
            self._frame = lz4.frame.LZ4FrameDecompressor()
        return b"".join(out)

    def close(self) -> None:
        if self._in_frame:
            raise _clickhouse_error(_CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", "truncated LZ4 frame")


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body, decoded. aiohttp has already undone gzip/deflate/br/zstd."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    lz4_frames = _Lz4Frames() if encoding == "lz4" else None
    async for chunk in request.content.iter_chunked(_READ_BYTES):
        data = lz4_frames.feed(chunk) if lz4_frames is not None else chunk
        if data:
            yield data
    if lz4_frames is not None:
        lz4_frames.close()


async def _statement_chunks(query_param: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # ClickHouse runs the `query` parameter followed by the body, joined by a newline.
    if query_param:
        yield query_param.encode() + b"\n"
    async for chunk in body:
        yield chunk


async def _batched(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    pending = bytearray(first)
    async for chunk in rest:
        pending += chunk
        if len(pending) >= _APPEND_BYTES:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


async def _read_head(statement: AsyncIterator[bytes]) -> tuple[bytes, _InsertHead | _Plain]:
    """Read until the statement's kind is known: the bytes read so far and the verdict."""
    buf = bytearray()
    async for chunk in statement:
        buf += chunk
        head = _scan_insert(bytes(buf), final=False)
        if head is not None:
            return bytes(buf), head
        if len(buf) > _HEAD_SCAN_BYTES:
            # No INSERT statement head is this long; let the engine parse whatever it is.
            return bytes(buf), "plain"
    final = _scan_insert(bytes(buf), final=True)
    assert final is not None  # a final scan always decides
    return bytes(buf), final


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    try:
        async for _chunk in chunks:
            pass
    except EmbeddedQueryError:  # undecodable body: nothing more worth reading
        return


def _decode_sql(sql: bytes) -> str:
    try:
        return sql.decode()
    except UnicodeDecodeError as exc:
        raise _clickhouse_error(
            _SYNTAX_ERROR, "SYNTAX_ERROR", f"query is not UTF-8: {exc}"
        ) from exc


# --- request parameters --------------------------------------------------------------------


@dataclass(slots=True)
class _Params:
    """What the URL (and a multipart form) asks for, besides the statement."""

    query: str = ""
    database: str = ""
    default_format: str = _DEFAULT_FORMAT
    query_id: str = ""
    readonly: bool = False
    bind: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)

    def update(self, values: Mapping[str, str]) -> None:
        for name, value in values.items():
            if name.startswith("param_"):
                # chdb takes ClickHouse's HTTP form of query parameters as is: the text of
                # the value (escaped like TSV), parsed by the engine as the placeholder's
                # declared type. No substitution into the SQL happens here.
                self.bind[name.removeprefix("param_")] = value
            elif name == "query":
                self.query = value
            elif name == "database":
                self.database = value
            elif name == "default_format":
                self.default_format = value or _DEFAULT_FORMAT
            elif name == "query_id":
                self.query_id = value
            elif name in ("compress", "decompress") and value not in ("", "0"):
                # ClickHouse's own block compression (not Content-Encoding); not provided.
                raise _clickhouse_error(
                    _NOT_IMPLEMENTED, "NOT_IMPLEMENTED", f"HTTP parameter {name}=1"
                )
            elif name not in _NOT_SETTINGS:
                self.settings[name] = value


async def _read_params(request: web.Request) -> _Params:
    params = _Params(readonly=request.method in ("GET", "HEAD"))
    params.update(request.query)
    if request.content_type == "multipart/form-data":
        # clickhouse-connect moves the query and large bound parameters into a form.
        fields: dict[str, str] = {}
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _query_too_large(request.app[_SERVER].max_query_bytes) from exc
        for name, value in form.items():
            if not isinstance(value, str):
                raise _clickhouse_error(
                    _NOT_IMPLEMENTED, "NOT_IMPLEMENTED", "external data (temporary tables)"
                )
            fields[name] = value
        params.update(fields)
    params.query_id = _query_id(params.query_id)
    return params


def _query_too_large(limit: int) -> EmbeddedQueryError:
    return _clickhouse_error(
        _QUERY_IS_TOO_LARGE,
        "QUERY_IS_TOO_LARGE",
        f"the statement is larger than {limit} bytes (setting embedded.clickhouse_max_query_bytes, "
        "SGPIPE_EMBEDDED__CLICKHOUSE_MAX_QUERY_BYTES); rows go as INSERT ... FORMAT data, "
        "which is streamed and not limited",
    )


_PRINTABLE_QUERY_ID = re.compile(r"[\x20-\x7e]{1,256}")


def _query_id(requested: str) -> str:
    """The client's query id if it can be echoed in a header (printable ASCII), else a new
    one: a control character would make the response itself fail."""
    return requested if _PRINTABLE_QUERY_ID.fullmatch(requested) else str(uuid.uuid4())


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _quote_string(value: str) -> str:
    # Quoted even for numeric settings: ClickHouse converts a string literal to the
    # setting's type, while a bare number would break String-typed settings.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- execution -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    body: bytes
    summary: dict[str, str]
    fmt: str | None = None


@dataclass(frozen=True, slots=True)
class _EngineInfo:
    setting_names: frozenset[str]
    timezone: str
    display_name: str
    policy: StatementPolicy


def _load_engine_info(conn_str: str) -> _EngineInfo:
    conn = _connect(conn_str)
    try:
        names = conn.query("SELECT name FROM system.settings", "TabSeparated").bytes()
        row = conn.query("SELECT timezone(), hostName()", "TabSeparated").bytes()
        table_functions = conn.query("SELECT name FROM system.table_functions", "TSV").bytes()
        functions = conn.query("SELECT name FROM system.functions", "TSV").bytes()
    finally:
        conn.close()
    timezone, display_name = row.decode().rstrip("\n").split("\t")
    policy = StatementPolicy.from_engine(
        table_functions.decode().split(), functions.decode().split()
    )
    return _EngineInfo(frozenset(names.decode().split()), timezone, display_name, policy)


def _open_request_connection(
    conn_str: str, params: _Params, settings: dict[str, str], *, readonly: bool
) -> _Connection:
    """A fresh handle set up for one request: its limits, its database and settings, nothing
    else. ``readonly``: the request may not change data (the reader's, and any GET)."""
    conn = _connect(conn_str)
    try:
        if readonly:
            # First, on its own: every SET after it, the client's included, is checked against
            # it, and the engine never lets readonly be lowered again on this handle. Like
            # ClickHouse, a GET never changes data (a browser may prefetch it), whoever asks.
            if settings.get("readonly", "2") in ("0", ""):
                raise _clickhouse_error(
                    _READONLY,
                    "READONLY",
                    "this request runs read-only (a GET, or the read-only user): "
                    "readonly=0 is not allowed; send writes as POST",
                )
            settings = {name: value for name, value in settings.items() if name != "readonly"}
            conn.query("SET readonly = 2", "TabSeparated")
        if params.database:
            conn.query(f"USE {_quote_identifier(params.database)}", "TabSeparated")
        assignments = [f"{name} = {_quote_string(value)}" for name, value in settings.items()]
        if assignments:
            conn.query("SET " + ", ".join(assignments), "TabSeparated")
    except BaseException:
        conn.close()
        raise
    return conn


class _ParseCache:
    """The engine's parse of recent statements, by statement text and the request's URL
    settings (some settings change how text parses). Dashboards and the sink send the same
    statements over and over; each parse is a round trip into the engine. Errors are not
    kept; the policy check itself runs on every request."""

    def __init__(self, size: int = 1024, max_statement: int = 16 * 1024) -> None:
        self._entries: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], Statement] = (
            OrderedDict()
        )
        self._size, self._max_statement = size, max_statement
        self._lock = threading.Lock()

    def parsed(self, conn: _Connection, sql: str, settings: Mapping[str, str]) -> Statement:
        if len(sql) > self._max_statement:
            return _parsed_statement(conn, sql)
        key = (sql, tuple(sorted(settings.items())))
        with self._lock:
            if (statement := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
                return statement
        statement = _parsed_statement(conn, sql)
        with self._lock:
            self._entries[key] = statement
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return statement


_PARSED: Final = _ParseCache()


def _parsed_statement(conn: _Connection, sql: str) -> Statement:
    """``sql`` as the engine's parser reads it: exactly one statement, its syntax tree and
    its canonical text (which the engine confirmed parses to the same tree).

    Runs on the request's own handle, so the parser sees the same settings as the execution.
    Raises the engine's error (syntax error, "Multi-statements are not allowed", ...).
    """
    bound = {"statement": escape_query_parameter(sql)}
    try:
        try:
            answer: _Result = conn.query(STATEMENT_TREE_QUERY, "RawBLOB", params=bound)
            return Statement.from_tree_answer(answer.bytes().decode())
        except RuntimeError as exc:
            if _INLINE_DATA in str(exc):
                raise _inline_rows_refused() from exc
            if not is_not_serializable(exc):
                raise
        canonical = conn.query(CANONICAL_QUERY, "RawBLOB", params=bound).bytes().decode()
        explained = conn.query(f"EXPLAIN AST {canonical}", "TabSeparatedRaw").bytes().decode()
        return Statement.from_explain(canonical, explained)
    except RuntimeError as exc:
        error = _engine_error(exc)
        # Say what was wrong with the client's statement, not with our call.
        raise EmbeddedQueryError(_CANONICAL_SCOPE.sub(r"\1", str(error)), error.code) from exc


# The engine's parser keeps no inline rows in its tree: rows after an INSERT's FORMAT clause
# that did not reach the streaming path would be dropped silently. Refuse instead.
_INLINE_DATA: Final = "INSERT with inline data is not supported"


def _inline_rows_refused() -> EmbeddedQueryError:
    return _clickhouse_error(
        _NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "INSERT ... SELECT takes no FORMAT clause here (rows after it would be dropped); "
        "inline rows go after INSERT ... FORMAT <format> or INSERT ... VALUES",
    )


def _checked_statement(
    conn: _Connection, sql: str, policy: StatementPolicy, *, readonly: bool, params: _Params
) -> Statement:
    """``sql`` parsed, if it passes the policy; raises ACCESS_DENIED if not."""
    try:
        statement = _PARSED.parsed(conn, sql, params.settings)
        check_statement(statement, policy, readonly=readonly, parameters=params.bind)
    except StatementDenied as denied:
        raise _clickhouse_error(ACCESS_DENIED, "ACCESS_DENIED", str(denied)) from denied
    return statement


def _run_query(
    conn: _Connection, sql: str, params: _Params, policy: StatementPolicy, *, readonly: bool
) -> _Outcome:
    # What runs is the canonical form of the checked tree, never the client's text.
    statement = _checked_statement(conn, sql, policy, readonly=readonly, params=params)
    if statement.insert_format is not None:
        raise _inline_rows_refused()
    fmt = (statement.output_format or params.default_format) if statement.returns_rows else None
    result: _Result = conn.query(
        statement.canonical, fmt or params.default_format, params=params.bind
    )
    body = result.bytes()
    summary = {
        "read_rows": str(result.storage_rows_read()),
        "read_bytes": str(result.storage_bytes_read()),
        "written_rows": str(result.rows_written()),
        "written_bytes": str(result.bytes_written()),
        "total_rows_to_read": "0",
        "result_rows": str(result.rows_read()),
        "result_bytes": str(len(body)),
        "elapsed_ns": str(int(result.elapsed() * 1e9)),
    }
    return _Outcome(body, summary, fmt)


def _insert_summary(result: _InsertResult) -> dict[str, str]:
    return {
        "read_rows": "0",
        "read_bytes": "0",
        "written_rows": str(result.rows_written),
        "written_bytes": str(result.bytes_written),
        "total_rows_to_read": "0",
        "result_rows": str(result.rows_written),
        "result_bytes": str(result.bytes_written),
        "elapsed_ns": str(int(result.elapsed * 1e9)),
    }


def _checked_insert_head(
    conn: _Connection,
    sql: str,
    fmt: str,
    policy: StatementPolicy,
    *,
    readonly: bool,
    params: _Params,
) -> str:
    """The canonical form of an INSERT head (without its FORMAT clause), checked."""
    statement = _checked_statement(
        conn, f"{sql} FORMAT {fmt}", policy, readonly=readonly, params=params
    )
    suffix = f" FORMAT {fmt}"
    if statement.insert_format != fmt or not statement.canonical.endswith(suffix):
        raise _clickhouse_error(
            ACCESS_DENIED, "ACCESS_DENIED", "an INSERT head this server cannot read"
        )
    return statement.canonical[: -len(suffix)]


class _StreamingInsert:
    """One request's streaming insert: its handle and chdb inserter.

    Each step runs as its own executor call, so no thread is held while the body trickles
    in. The lock orders `release` after a step still running for a cancelled request (which
    may be about to store the handle), so the handle is always closed: a leaked handle would
    keep the engine, and the lock on the data path, alive after the server stops.
    """

    def __init__(
        self,
        conn_str: str,
        params: _Params,
        settings: dict[str, str],
        policy: StatementPolicy,
        *,
        readonly: bool,
    ) -> None:
        self._conn_str = conn_str
        self._params = params
        self._settings = settings
        self._policy = policy
        self._readonly = readonly
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._inserter: _Inserter | None = None

    def begin(self, sql: str, fmt: str) -> None:
        with self._lock:
            self._conn = _open_request_connection(
                self._conn_str,
                self._params,
                self._settings,
                readonly=self._readonly or self._params.readonly,
            )
            head = _checked_insert_head(
                self._conn,
                sql,
                fmt,
                self._policy,
                readonly=self._readonly,
                params=self._params,
            )
            self._inserter = self._conn.send_insert(head, fmt)

    def append(self, data: bytes) -> None:
        with self._lock:
            assert self._inserter is not None
            self._inserter.append(data)

    def finish(self) -> _InsertResult:
        with self._lock:
            assert self._inserter is not None
            return self._inserter.finish()

    def release(self) -> None:
        """Abort the insert unless finished (cancel is then a no-op); close the handle."""
        with self._lock:
            conn, inserter = self._conn, self._inserter
            self._conn = self._inserter = None
            if conn is None:
                return
            try:
                if inserter is not None:
                    inserter.cancel()
            except RuntimeError:
                log.debug("embedded_clickhouse.insert_cancel_failed", exc_info=True)
            finally:
                conn.close()


class _Server:
    """Per-app state: the engine's connection string, engine facts, the chdb thread pool."""

    def __init__(self, conn_str: str, max_query_bytes: int = MAX_QUERY_BYTES) -> None:
        self.conn_str = conn_str
        self.max_query_bytes = max_query_bytes
        self.info = _EngineInfo(frozenset(), "UTC", "chdb", StatementPolicy(frozenset()))
        self._executor = ThreadPoolExecutor(_WORKERS, thread_name_prefix="chdb-http")

    async def on_startup(self, _app: web.Application) -> None:
        self.info = await self._call(lambda: _load_engine_info(self.conn_str))

    async def on_cleanup(self, _app: web.Application) -> None:
        # Waits for calls still running (e.g. of a request whose client went away) and the
        # handle releases queued behind them, so the engine can be closed safely after.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except RuntimeError as exc:  # chdb's errors (ChdbError is a RuntimeError)
            raise _engine_error(exc) from exc

    def engine_settings(self, params: _Params) -> dict[str, str]:
        """The URL settings the engine knows; others (HTTP-only, client bookkeeping, or from
        a newer server) are dropped rather than failing the request."""
        known = {}
        for name, value in params.settings.items():
            if name in self.info.setting_names and _SETTING_NAME.match(name):
                known[name] = value
            else:
                log.debug("embedded_clickhouse.setting_ignored", setting=name)
        return known

    async def execute(
        self, user: EmbeddedUser, params: _Params, statement: AsyncIterator[bytes]
    ) -> _Outcome:
        head_bytes, head = await _read_head(statement)
        if isinstance(head, _InsertHead):
            try:
                return await self._insert(
                    user, params, head, head_bytes[head.data_start :], statement
                )
            except EmbeddedQueryError:
                # Read the rest of the body first: a client still sending it (urllib3 sends
                # the whole body before reading) would otherwise see a broken pipe instead
                # of the error.
                await _drain(statement)
                raise
        parts, size = [head_bytes], len(head_bytes)
        async for chunk in statement:
            parts.append(chunk)
            size += len(chunk)
            if size > self.max_query_bytes:
                break
        if size > self.max_query_bytes:
            parts.clear()
            await _drain(statement)  # so that a client sending the whole body first sees this
            raise _query_too_large(self.max_query_bytes)
        sql_bytes = b"".join(parts)
        if not sql_bytes.strip():
            raise _clickhouse_error(_SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
        sql = _decode_sql(sql_bytes)
        # The statement check reads with the user's allowlist; the engine's readonly=2 also
        # covers any GET.
        policy, reader = self.info.policy, user.readonly
        return await self._with_connection(
            params,
            reader or params.readonly,
            lambda conn: _run_query(conn, sql, params, policy, readonly=reader),
        )

    async def _with_connection(
        self, params: _Params, readonly: bool, fn: Callable[[_Connection], _Outcome]
    ) -> _Outcome:
        settings = self.engine_settings(params)

        def run() -> _Outcome:
            conn = _open_request_connection(self.conn_str, params, settings, readonly=readonly)
            try:
                return fn(conn)
            finally:
                conn.close()

        return await self._call(run)

    async def _insert(
        self,
        user: EmbeddedUser,
        params: _Params,
        head: _InsertHead,
        first: bytes,
        rest: AsyncIterator[bytes],
    ) -> _Outcome:
        sql = _decode_sql(head.sql)
        insert = _StreamingInsert(
            self.conn_str,
            params,
            self.engine_settings(params),
            self.info.policy,
            readonly=user.readonly,
        )
        try:
            await self._call(lambda: insert.begin(sql, head.fmt))
            async for data in _batched(first, rest):
                await self._call(functools.partial(insert.append, data))
            result = await self._call(insert.finish)
        finally:
            # Submitted, not awaited: it runs even when this task is being cancelled, and
            # the executor's shutdown waits for it.
            self._executor.submit(insert.release)
        return _Outcome(b"", _insert_summary(result))


# --- who may ask ---------------------------------------------------------------------------


class _Authenticator:
    """Checks the credentials a request presents, the ways ClickHouse accepts them.

    Names and passwords are compared as SHA-256 digests with ``hmac.compare_digest``, against
    every user, so the time taken depends neither on how much of a guess was right nor on
    which user it named.
    """

    def __init__(self, credentials: EmbeddedCredentials) -> None:
        self._users = [
            (user, _digest(user.name), _digest(user.password)) for user in credentials.users
        ]

    def authenticate(self, request: web.Request) -> EmbeddedUser:
        presented = _presented_credentials(request)
        if presented is None:
            raise _AuthenticationRequired()
        name, password = _digest(presented[0]), _digest(presented[1])
        found: EmbeddedUser | None = None
        for user, user_name, user_password in self._users:
            # `&`, not `and`: both comparisons always run.
            if hmac.compare_digest(name, user_name) & hmac.compare_digest(password, user_password):
                found = user
        if found is None:
            raise _AuthenticationFailed()
        return found


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class _AuthenticationFailed(Exception):
    status = 403
    message = "Authentication failed: password is incorrect, or there is no user with such name"


class _AuthenticationRequired(_AuthenticationFailed):
    # 401 tells a client to authenticate; no WWW-Authenticate header, so that a browser
    # never shows a login dialog for this port.
    status = 401
    message = (
        "Authentication required: pass a user and password (HTTP Basic, the "
        "X-ClickHouse-User and X-ClickHouse-Key headers, or the user and password parameters)"
    )


class _AmbiguousCredentials(_AuthenticationFailed):
    message = "Invalid authentication: use one of HTTP Basic, X-ClickHouse-* headers or parameters"


def _presented_credentials(request: web.Request) -> tuple[str, str] | None:
    """(user, password) from exactly one of ClickHouse's three ways, or None if none is used.
    Like ClickHouse, a missing user name means `default` (which does not exist here)."""
    presented: list[tuple[str, str]] = []
    headers = request.headers
    if "X-ClickHouse-User" in headers or "X-ClickHouse-Key" in headers:
        presented.append(
            (headers.get("X-ClickHouse-User", "default"), headers.get("X-ClickHouse-Key", ""))
        )
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            raise _AuthenticationFailed()
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _AuthenticationFailed() from None
        user, _, password = decoded.partition(":")
        presented.append((user or "default", password))
    if "user" in request.query or "password" in request.query:
        presented.append((request.query.get("user", "default"), request.query.get("password", "")))
    if len(presented) > 1:
        raise _AmbiguousCredentials()
    return presented[0] if presented else None


class _FailureLog:
    """One log line per minute at most for refused requests, with how many there were: a
    flood of bad requests must not become a flood of log lines."""

    _INTERVAL: Final = 60.0

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._last = 0.0

    def record(self, reason: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last >= self._INTERVAL:
            log.warning("embedded_clickhouse.requests_refused", **self._counts)
            self._counts.clear()
            self._last = now


_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def _browser_refusal(request: web.Request, allowed_origins: frozenset[str], loopback: bool) -> str:
    """Why a request looks like it comes from a web page ("" if it does not).

    A page can make a browser send "simple" requests (a text/plain or form POST, a GET) to
    any address without asking the server first; such requests always carry an Origin (or,
    from older browsers, at least Sec-Fetch-Site), which clients such as clickhouse-connect,
    curl or a BI server never send unless told to. DNS rebinding makes the page's own origin
    resolve to 127.0.0.1: then the Host header still names the attacker's domain.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        return "" if origin in allowed_origins else "origin"
    if request.headers.get("Sec-Fetch-Site", "none") not in ("none", "same-origin"):
        return "cross_site"
    if request.headers.get("Sec-Fetch-Mode") == "navigate" and request.method == "POST":
        return "form_post"  # a form submitted by a page, whatever its content type
    if loopback:
        host = request.headers.get("Host", "")
        if host and _host_name(host) not in _LOOPBACK_HOSTS:
            return "host"
    return ""


def _host_name(host: str) -> str:
    """The name in a Host header, without the port: "[::1]:8123" -> "[::1]"."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


_SERVER: Final = web.AppKey("embedded_clickhouse", _Server)
_AUTHENTICATOR: Final = web.AppKey("embedded_clickhouse_authenticator", _Authenticator)
_FAILURES: Final = web.AppKey("embedded_clickhouse_failures", _FailureLog)


# --- HTTP handlers -------------------------------------------------------------------------


def _headers(server: _Server, query_id: str, settings: Mapping[str, str]) -> dict[str, str]:
    return {
        "X-ClickHouse-Query-Id": query_id,
        "X-ClickHouse-Server-Display-Name": server.info.display_name,
        # clickhouse-connect reads result DateTimes in this zone; a per-query
        # session_timezone changes it, as on a real server.
        "X-ClickHouse-Timezone": settings.get("session_timezone") or server.info.timezone,
    }


def _error_response(
    server: _Server, error: EmbeddedQueryError, query_id: str, status: int | None = None
) -> web.Response:
    headers = _headers(server, query_id, {})
    headers["X-ClickHouse-Exception-Code"] = str(error.code)
    headers["Content-Type"] = "text/plain; charset=UTF-8"
    return web.Response(
        status=status or _http_status(error), body=f"{error}\n".encode(), headers=headers
    )


async def _ping(_request: web.Request) -> web.Response:
    return web.Response(text="Ok.\n")


async def _handle(request: web.Request) -> web.Response:
    server = request.app[_SERVER]
    if request.method == "GET" and "query" not in request.query:
        return await _ping(request)
    query_id = _query_id(request.query.get("query_id", ""))
    try:
        user = request.app[_AUTHENTICATOR].authenticate(request)
    except _AuthenticationFailed as refused:
        request.app[_FAILURES].record("authentication_failed")
        error = _clickhouse_error(_AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED", refused.message)
        return _error_response(server, error, query_id, refused.status)
    try:
        params = await _read_params(request)
        query_id = params.query_id
        statement = _statement_chunks(params.query, _body_chunks(request))
        outcome = await server.execute(user, params, statement)
    except EmbeddedQueryError as error:
        log.debug("embedded_clickhouse.query_failed", query_id=query_id, error=str(error))
        return _error_response(server, error, query_id)
    except ConnectionError:
        # The client went away mid-body (an unfinished insert has been aborted). Nobody will
        # read this response; returning it keeps aiohttp from logging an error.
        log.debug("embedded_clickhouse.client_disconnected", query_id=query_id)
        return web.Response(status=400, text="client disconnected\n")
    except Exception as exc:
        # A bug here, not a query error: still answer like ClickHouse so clients show it.
        log.warning("embedded_clickhouse.internal_error", query_id=query_id, exc_info=True)
        internal = _clickhouse_error(_STD_EXCEPTION, "STD_EXCEPTION", repr(exc))
        return _error_response(server, internal, query_id)
    headers = _headers(server, query_id, params.settings)
    headers["X-ClickHouse-Summary"] = json.dumps(outcome.summary, separators=(",", ":"))
    if outcome.fmt is not None:
        headers["X-ClickHouse-Format"] = outcome.fmt
        headers["Content-Type"] = _content_type(outcome.fmt)
    else:
        headers["Content-Type"] = "text/plain; charset=UTF-8"
    return web.Response(body=outcome.body, headers=headers)


def _refuse_browsers(allowed_origins: frozenset[str], loopback: bool) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = _browser_refusal(request, allowed_origins, loopback)
        if reason:
            request.app[_FAILURES].record(f"browser_{reason}")
            error = _clickhouse_error(
                ACCESS_DENIED,
                "ACCESS_DENIED",
                "requests from web pages are not accepted by the embedded ClickHouse "
                "(embedded.clickhouse_allowed_origins lists the origins that are)",
            )
            return _error_response(request.app[_SERVER], error, str(uuid.uuid4()), 403)
        return await handler(request)

    return middleware


def create_http_app(
    conn_str: str,
    credentials: EmbeddedCredentials,
    *,
    allowed_origins: tuple[str, ...] = (),
    loopback: bool = True,
    max_query_bytes: int = MAX_QUERY_BYTES,
) -> web.Application:
    """The aiohttp app implementing the subset of ClickHouse's HTTP interface that
    clickhouse-connect (sync and async) and simple BI tools use, for the engine that
    ``conn_str`` names (opened by `_Engine`, with sgpipe's access control).

    `GET /ping` and `GET /` answer "Ok." without credentials, like ClickHouse; every query
    needs the writer's or the reader's. `GET /?query=...` and `POST /` run a statement taken
    from the `query` parameter, a line break and the body (as in ClickHouse); a GET runs with
    readonly=2. `param_<name>` parameters bind `{name:Type}` placeholders, `database` and
    `default_format` work as in ClickHouse, other parameters are applied as settings when the
    engine knows them and ignored otherwise (including `session_id`: every request runs in a
    fresh context). Multipart forms (query and parameters as fields) are accepted; external
    data (temporary tables) is not. Requests from web pages are refused (`_browser_refusal`);
    ``loopback``: the server listens on a loopback address, so the Host must name one.
    ``max_query_bytes``: a longer statement (forms included; not streamed insert rows) gets
    413 QUERY_IS_TOO_LARGE.
    """
    server = _Server(conn_str, max_query_bytes)
    app = web.Application(
        client_max_size=max_query_bytes,
        middlewares=[_refuse_browsers(frozenset(allowed_origins), loopback)],
    )
    app[_SERVER] = server
    app[_AUTHENTICATOR] = _Authenticator(credentials)
    app[_FAILURES] = _FailureLog()
    app.on_startup.append(server.on_startup)
    app.on_cleanup.append(server.on_cleanup)
    app.router.add_get("/ping", _ping)
    app.router.add_route("GET", "/", _handle)
    app.router.add_route("POST", "/", _handle)
    return app


# --- the owner ---------------------------------------------------------------------------


class _Engine:
    """The chdb engine on a data path, started with sgpipe's access control: an owner handle
    that keeps it (and the lock on the data path) alive, and the connection string every
    request handle must use (chdb hosts one engine per process and rejects handles to any
    other path)."""

    def __init__(self, data_path: pathlib.Path) -> None:
        path = str(data_path.resolve())
        if any(character in path for character in "?&#"):
            # chdb reads the connection string as `file:<path>?<arguments>`.
            raise ValueError(f"the ClickHouse data path may not contain ?, & or #: {path}")
        # Private, and removed at close: the engine reads its configuration from here.
        self._config_dir = pathlib.Path(tempfile.mkdtemp(prefix="sgpipe-clickhouse-"))
        try:
            config = write_engine_config(self._config_dir)
            self.conn_str = f"file:{path}?config-file={config}"
            self._owner: _Connection | None = _connect(self.conn_str)
        except BaseException:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            raise
        try:
            _verify_lockdown(self._owner)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.close()
        shutil.rmtree(self._config_dir, ignore_errors=True)


def _verify_lockdown(conn: _Connection) -> None:
    """Prove the engine runs with sgpipe's access control: if chdb cannot read the users file
    it silently falls back to a user that may do anything."""
    try:
        conn.query(LOCKDOWN_PROBE, "TabSeparated")
        probe_code: int | None = None
    except RuntimeError as exc:
        probe_code = _engine_error(exc).code
    unlocked = conn.query(unlocked_settings_query(), "TabSeparated").bytes().decode().split()
    if probe_code != ACCESS_DENIED or unlocked:
        raise LockdownError(
            "the embedded ClickHouse did not start with sgpipe's access control "
            f"(file() probe: {probe_code}, settings not locked: {unlocked}); refusing to serve"
        )


def _open_engine(data_path: pathlib.Path) -> _Engine:
    data_path.mkdir(parents=True, exist_ok=True)
    try:
        return _Engine(data_path)
    except LockdownError:
        raise
    except RuntimeError as exc:
        # The engine prints the cause (usually "Cannot lock file .../status") to stderr and
        # raises a generic start-up error.
        raise RuntimeError(
            f"cannot open the ClickHouse store at {data_path} (is another process using it?): {exc}"
        ) from exc


class EmbeddedClickHouse:
    """Owns the chdb engine on `data_path` and serves ClickHouse's HTTP interface for it,
    to the users in ``credentials`` only."""

    def __init__(
        self,
        data_path: pathlib.Path,
        credentials: EmbeddedCredentials,
        *,
        allowed_origins: tuple[str, ...] = (),
        max_query_bytes: int = MAX_QUERY_BYTES,
    ) -> None:
        self._data_path = data_path
        self._credentials = credentials
        self._allowed_origins = allowed_origins
        self._max_query_bytes = max_query_bytes
        self._engine: _Engine | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 8123) -> str:
        """Open the engine (creating data_path) and start serving; returns the base URL like
        "http://127.0.0.1:8123" (port 0 = pick a free port; the URL has the real one)."""
        if self._engine is not None:
            raise RuntimeError("embedded ClickHouse is already started")
        # Engine start-up blocks (and takes the data path's lock): keep it off the loop.
        self._engine = await asyncio.to_thread(_open_engine, self._data_path)
        try:
            app = create_http_app(
                self._engine.conn_str,
                self._credentials,
                allowed_origins=self._allowed_origins,
                loopback=host in _LOOPBACK_HOSTS,
                max_query_bytes=self._max_query_bytes,
            )
            # No access log: it would log every request at info.
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runner = runner
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await self.stop()
            raise
        bound_port = runner.addresses[0][1]
        self._url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
        log.debug("embedded_clickhouse.serving", url=self._url, data_path=str(self._data_path))
        return self._url

    async def stop(self) -> None:
        """Stop serving, then close the engine. Idempotent."""
        self._url = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("embedded ClickHouse is not serving; call start() first")
        return self._url


def query_tsv(data_path: pathlib.Path, sql: str, *, database: str | None = None) -> bytes:
    """`query_store` with TabSeparated output."""
    return query_store(data_path, sql, database=database)


def query_store(
    data_path: pathlib.Path,
    sql: str,
    *,
    database: str | None = None,
    fmt: str = _DEFAULT_FORMAT,
) -> bytes:
    """Open chdb directly on data_path (nobody else holds it), run sql as the writer would
    over HTTP (same access control, same statement check), return its output in `fmt` (or in
    the query's own FORMAT if it has one). `database`, if given, is the default database for
    unqualified table names.

    Raises EmbeddedQueryError with ClickHouse's text when the query fails, or when the store
    cannot be opened (e.g. another process serves it: query that server instead).
    """
    if not data_path.is_dir():
        # chdb would silently create an empty store at a mistyped path.
        raise FileNotFoundError(f"no ClickHouse data directory at {data_path}")
    try:
        engine = _Engine(data_path)
    except LockdownError:
        raise
    except RuntimeError as exc:
        # The engine prints the cause (usually "Cannot lock file .../status") to stderr and
        # raises a generic start-up error.
        error = _engine_error(exc)
        hint = f"{error}; is another process serving {data_path}? Query it over HTTP instead"
        raise EmbeddedQueryError(hint, error.code) from exc
    try:
        info = _load_engine_info(engine.conn_str)
        params = _Params(database=database or "", default_format=fmt)
        sql_bytes = sql.encode()
        head = _scan_insert(sql_bytes, final=True)
        if isinstance(head, _InsertHead):
            # As over HTTP: the rows are data for the insert, never SQL.
            insert = _StreamingInsert(engine.conn_str, params, {}, info.policy, readonly=False)
            try:
                insert.begin(_decode_sql(head.sql), head.fmt)
                insert.append(sql_bytes[head.data_start :])
                insert.finish()
            finally:
                insert.release()
            return b""
        conn = _open_request_connection(engine.conn_str, params, {}, readonly=False)
        try:
            return _run_query(conn, sql, params, info.policy, readonly=False).body
        finally:
            conn.close()
    except RuntimeError as exc:
        raise _engine_error(exc) from exc
    finally:
        engine.close()
