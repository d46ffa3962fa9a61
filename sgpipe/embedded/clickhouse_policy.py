"""What a user of the embedded ClickHouse may do, and the two engine-side layers enforcing it.

chdb runs ClickHouse as `clickhouse-local`, whose built-in user may read and write any file
the process can (`file()`, `INTO OUTFILE`, a `Filesystem` database), reach any host (`url()`,
`s3()`, `remote()`, dynamic `disk(type = web)`), and run scripts (`executable()`). Nothing of
that is needed to store and read email events, so:

1. **Engine access control** (`write_engine_config`). The engine starts with a users file of
   our own: its only user holds an explicit list of grants -- data and DDL on tables, no
   `SOURCES` (no `READ`/`WRITE ON FILE`, `URL`, `S3`, `REMOTE`, ...), `TABLE ENGINE` only for
   local storage engines, no dictionaries, functions, `SYSTEM`, backups, introspection or
   access management -- and a settings profile whose constraints pin every setting that names
   a file, a URL, a parser dialect or a default engine. The engine's own checks enforce these,
   whatever the SQL looks like. `verify_lockdown` proves at every start that the file was
   loaded: chdb silently falls back to an all-powerful user when it cannot find it.

2. **The engine's parser** (`check_statement`). A few ways out are not access-controlled in
   local mode: the scalar function `file()`, `INTO OUTFILE`, `FROM INFILE`, `disk(...)` in
   a table's settings (it creates directories and fetches URLs while parsing), and chdb's own
   table functions (`python`, `eval`, `filesystem`, ...). Each statement is therefore first
   rendered by the engine's own parser in canonical form (`formatQuerySingleLine`: one
   statement, comments gone, keywords and quoting normalized) and that canonical text is
   checked here -- statement kinds and table functions against allowlists, engines against an
   allowlist, a short denylist of scalar functions -- and then it, not the client's text, is
   what runs. Multi-statements fail to format, so they never run. Anything the checks cannot
   read is refused.

The reader user additionally runs every request with `readonly = 2` (see the HTTP layer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from xml.sax.saxutils import escape

# --- layer 1: the engine's configuration ----------------------------------------------------

# The table engines a writer may create; the same list is granted and checked in the SQL.
# All of them keep their data under the engine's own data path.
TABLE_ENGINES: Final = (
    "MergeTree",
    "ReplacingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
    "CoalescingMergeTree",
    "Memory",
    "Null",
    "Set",
    "Join",
    "Buffer",
    "Log",
    "TinyLog",
    "StripeLog",
)
DATABASE_ENGINES: Final = ("Atomic", "Memory")

# Everything sgpipe's writer needs (DDL and data on tables and views, mutations for
# `forget`), nothing that reaches outside the data path. ALTER is granted piecewise: its
# FREEZE, MOVE and FETCH parts write elsewhere or fetch from other hosts.
_GRANTS: Final = (
    "GRANT SELECT, INSERT, CREATE DATABASE, CREATE TABLE, CREATE VIEW, DROP DATABASE, "
    "DROP TABLE, DROP VIEW, TRUNCATE, OPTIMIZE, SHOW, CHECK ON *.*",
    "GRANT ALTER UPDATE, ALTER DELETE, ALTER COLUMN, ALTER INDEX, ALTER CONSTRAINT, "
    "ALTER TTL, ALTER SETTINGS, ALTER PROJECTION, ALTER MODIFY COMMENT, ALTER VIEW ON *.*",
    *(f"GRANT TABLE ENGINE ON {engine}" for engine in TABLE_ENGINES),
)

# Settings no client may change (a settings-profile constraint), with the value to pin where
# the default is not safe. Each names a file or URL the engine would open, a parser dialect
# (the statement check reads ClickHouse SQL), a default engine, or a way to evaluate SQL
# expressions inside insert data.
LOCKED_SETTINGS: Final[dict[str, str | None]] = {
    "input_format_values_interpret_expressions": "0",  # VALUES (file('/etc/passwd'))
    "input_format_values_deduce_templates_of_expressions": "0",
    "format_schema": None,
    "format_schema_source": None,
    "output_format_schema": None,
    "format_template_resultset": None,
    "format_template_row": None,
    "input_format_record_errors_file_path": None,
    "format_avro_schema_registry_url": None,
    "into_outfile_create_parent_directories": None,
    "dialect": None,
    "polyglot_dialect": None,
    "allow_experimental_kusto_dialect": None,
    "allow_experimental_prql_dialect": None,
    "allow_experimental_polyglot_dialect": None,
    "enable_json_ast_dialect": None,
    "enable_trino_dialect": None,
    "implicit_table_at_top_level": None,
    "default_table_engine": None,
    "default_temporary_table_engine": None,
    "default_database_engine": None,
    "allow_experimental_ai_functions": None,
    "allow_introspection_functions": "0",  # on in clickhouse-local; no grant uses it here
    "dynamic_disk_allow_from_env": None,
    "dynamic_disk_allow_from_zk": None,
    "dynamic_disk_allow_include": None,
    "allow_database_glue_catalog": None,
    "allow_database_unity_catalog": None,
    "allow_experimental_database_glue_catalog": None,
    "allow_experimental_database_hms_catalog": None,
    "allow_experimental_database_unity_catalog": None,
    "allow_experimental_database_paimon_rest_catalog": None,
    "url_base": None,
    # MergeTree table settings are constrained by their name with this prefix: a table may not
    # pick its disk or storage policy (only the default one exists).
    "merge_tree_disk": None,
    "merge_tree_storage_policy": None,
}

CONFIG_FILE: Final = "config.xml"
USERS_FILE: Final = "users.xml"


def write_engine_config(directory: Path) -> Path:
    """Write the engine's configuration into ``directory`` (a private directory the caller
    owns for the engine's lifetime); returns the path to pass as ``config-file``.

    The directories for user files, scripts and format schemas are created empty inside it,
    so that even a relative path the engine resolves lands nowhere useful.
    """
    for name in ("user_files", "user_scripts", "format_schemas"):
        (directory / name).mkdir(mode=0o700, exist_ok=True)
    users = directory / USERS_FILE
    users.write_text(_users_xml(), encoding="utf-8")
    config = directory / CONFIG_FILE
    config.write_text(
        "<clickhouse>\n"
        f"  <user_files_path>{_xml(directory / 'user_files')}/</user_files_path>\n"
        f"  <user_scripts_path>{_xml(directory / 'user_scripts')}/</user_scripts_path>\n"
        f"  <format_schema_path>{_xml(directory / 'format_schemas')}/</format_schema_path>\n"
        "  <user_directories>\n"
        f"    <users_xml><path>{_xml(users)}</path></users_xml>\n"
        "  </user_directories>\n"
        "</clickhouse>\n",
        encoding="utf-8",
    )
    return config


def _xml(value: object) -> str:
    return escape(str(value))


def _users_xml() -> str:
    values = "".join(
        f"      <{name}>{_xml(value)}</{name}>\n"
        for name, value in LOCKED_SETTINGS.items()
        if value is not None
    )
    constraints = "".join(f"        <{name}><readonly/></{name}>\n" for name in LOCKED_SETTINGS)
    grants = "".join(f"        <query>{_xml(grant)}</query>\n" for grant in _GRANTS)
    return (
        "<clickhouse>\n"
        "  <profiles>\n"
        "    <default>\n"
        f"{values}"
        "      <constraints>\n"
        f"{constraints}"
        "      </constraints>\n"
        "    </default>\n"
        "  </profiles>\n"
        "  <users>\n"
        "    <default>\n"
        # The engine's only user is reachable only in-process: the HTTP layer authenticates.
        "      <password></password>\n"
        "      <networks><ip>::/0</ip></networks>\n"
        "      <profile>default</profile>\n"
        "      <quota>default</quota>\n"
        "      <grants>\n"
        f"{grants}"
        "      </grants>\n"
        "    </default>\n"
        "  </users>\n"
        "  <quotas><default></default></quotas>\n"
        "</clickhouse>\n"
    )


# What `verify_lockdown` runs: a read the grants must refuse, and the locked settings the
# profile must have made read-only.
LOCKDOWN_PROBE: Final = "SELECT * FROM file('sgpipe-lockdown-probe', 'LineAsString', 'l String')"
ACCESS_DENIED: Final = 497


def unlocked_settings_query() -> str:
    names = ", ".join(f"'{name}'" for name in LOCKED_SETTINGS if not name.startswith("merge_tree_"))
    return f"SELECT name FROM system.settings WHERE name IN ({names}) AND readonly = 0"


# --- layer 2: statements, checked in the engine's canonical form -----------------------------

# Table functions that only compute (the engine lists all others, and new ones, as denied).
SAFE_TABLE_FUNCTIONS: Final = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generaterandom",
        "generateseries",
        "generate_series",
        "primes",
        "values",
        "view",
        "null",
        "format",  # also the string function format('{}', x)
    }
)
# Scalar functions that reach the file system or the network without an access check in
# local mode (`file` reads any path), or that are no function but create a disk on the spot.
DENIED_SCALAR_FUNCTIONS: Final = frozenset({"file", "disk", "catboostevaluate"})
# The LLM-calling functions (also off by a locked setting).
_AI_FUNCTION = re.compile(r"^(?:ai|AI)[A-Z]")

# Statement kinds, by the canonical form's first keyword.
_READ_KINDS: Final = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "EXISTS", "EXPLAIN", "SET", "USE"}
)
_WRITE_KINDS: Final = _READ_KINDS | frozenset(
    {
        "INSERT",
        "CREATE",
        "ALTER",
        "DROP",
        "TRUNCATE",
        "OPTIMIZE",
        "RENAME",
        "EXCHANGE",
        "DELETE",
        "UPDATE",
        "CHECK",
    }
)
_CREATE_OBJECTS: Final = frozenset({"TABLE", "VIEW", "MATERIALIZED", "DATABASE"})
_DROP_OBJECTS: Final = frozenset({"TABLE", "VIEW", "DATABASE"})
_ALLOWED_ENGINES: Final = frozenset(name.lower() for name in (*TABLE_ENGINES, *DATABASE_ENGINES))


class StatementDenied(Exception):
    """The statement does something no user of the embedded store may do."""


@dataclass(frozen=True, slots=True)
class StatementPolicy:
    denied_functions: frozenset[str]  # lower-case names

    @classmethod
    def from_engine(
        cls, table_functions: Iterable[str], functions: Iterable[str]
    ) -> StatementPolicy:
        """The policy for this engine build: every table function it has but the safe ones,
        the denied scalar functions, and the AI functions it has."""
        denied = {name.lower() for name in table_functions} - SAFE_TABLE_FUNCTIONS
        denied |= DENIED_SCALAR_FUNCTIONS
        denied |= {name.lower() for name in functions if _AI_FUNCTION.match(name)}
        return cls(frozenset(denied))


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # word, identifier (quoted), string, number, punct
    text: str  # words upper-cased; quoted identifiers unquoted

    def is_name(self) -> bool:
        return self.kind in ("word", "identifier")


# The canonical form only: single-quoted strings and back-quoted identifiers with backslash
# escapes, no comments. A quote that does not close is left to `bad` and refused.
_CANONICAL_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<string>'(?:[^'\\]|\\.)*')
    | (?P<identifier>`(?:[^`\\]|\\.)*`|"(?:[^"\\]|\\.)*")
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<number>[0-9][0-9A-Za-z_.]*)
    | (?P<bad>['"`\\])
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _tokens(canonical: str) -> Iterator[_Token]:
    for match in _CANONICAL_TOKEN.finditer(canonical):
        kind, text = match.lastgroup, match.group()
        if kind == "space":
            continue
        if kind == "bad":
            raise StatementDenied("the statement's canonical form could not be read")
        if kind == "word":
            yield _Token("word", text.upper() if text.isascii() else text)
        elif kind == "identifier":
            yield _Token("identifier", _ESCAPE.sub(r"\1", text[1:-1]))
        else:
            assert kind is not None
            yield _Token(kind, text)


def statement_kind(canonical: str) -> str:
    """The first keyword of a canonical statement ("" if it has none)."""
    for token in _tokens(canonical):
        return token.text if token.kind == "word" else ""
    return ""


def check_statement(canonical: str, policy: StatementPolicy, *, readonly: bool) -> None:
    """Raise StatementDenied unless ``canonical`` -- one statement as the engine's
    ``formatQuerySingleLine`` rendered it -- stays inside the data path.

    ``readonly``: the reader's allowlist of statement kinds (reads and SET only).
    """
    tokens = list(_tokens(canonical))
    if not tokens or tokens[0].kind != "word":
        raise StatementDenied("not a statement this server runs")
    kind = tokens[0].text
    allowed = _READ_KINDS if readonly else _WRITE_KINDS
    if kind not in allowed:
        who = "the read-only user" if readonly and kind in _WRITE_KINDS else "any user"
        raise StatementDenied(f"{kind} statements are not allowed for {who}")
    _check_statement_object(kind, tokens)
    for index, token in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "word" and following is not None and following.kind == "word":
            if (token.text, following.text) == ("INTO", "OUTFILE"):
                raise StatementDenied("INTO OUTFILE is not allowed: results go to the client")
            if (token.text, following.text) == ("FROM", "INFILE"):
                raise StatementDenied("FROM INFILE is not allowed: send the data in the request")
        if following is not None and following.text == "(":
            if token.is_name() and token.text.lower() in policy.denied_functions:
                raise StatementDenied(
                    f"{token.text.lower()}() reaches outside the store and is not allowed"
                )
            if token.kind == "punct" and token.text == "}":
                raise StatementDenied("a query parameter cannot name a function")
        if token.kind == "word" and token.text == "ENGINE":
            _check_engine(tokens[index + 1 : index + 3])


def _check_statement_object(kind: str, tokens: list[_Token]) -> None:
    words = [token.text for token in tokens[1:5] if token.kind == "word"]
    if kind == "CREATE":
        rest = words[2:] if words[:2] == ["OR", "REPLACE"] else words
        rest = rest[1:] if rest[:1] == ["TEMPORARY"] else rest
        if not rest or rest[0] not in _CREATE_OBJECTS:
            raise StatementDenied(
                "CREATE is allowed for tables, views and databases only (no dictionaries, "
                "functions, users or other objects)"
            )
    elif kind == "DROP":
        rest = words[1:] if words[:1] == ["TEMPORARY"] else words
        if not rest or rest[0] not in _DROP_OBJECTS:
            raise StatementDenied("DROP is allowed for tables, views and databases only")
    elif kind == "SET":
        # `SET name = value, ...` only: not SET ROLE, SET DEFAULT ROLE, SET TRANSACTION.
        if len(tokens) < 3 or not tokens[1].is_name() or tokens[2].text != "=":
            raise StatementDenied("only SET name = value is allowed")
        if tokens[1].kind == "word" and tokens[1].text in ("ROLE", "DEFAULT", "TRANSACTION"):
            raise StatementDenied(f"SET {tokens[1].text} is not allowed")


def _check_engine(after: list[_Token]) -> None:
    if len(after) == 2 and after[0].text == "=" and after[1].is_name():
        if after[1].text.lower() in _ALLOWED_ENGINES:
            return
        raise StatementDenied(
            f"ENGINE = {after[1].text} is not allowed; allowed: "
            + ", ".join((*TABLE_ENGINES, *DATABASE_ENGINES))
        )
    raise StatementDenied("an ENGINE clause this server cannot read")


def escape_query_parameter(text: str) -> str:
    """``text`` as the value of a ``{name:String}`` query parameter, which the engine reads in
    the escaped (TSV) form."""
    return (
        text.replace("\\", "\\\\")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace("\0", "\\0")
    )


CANONICAL_QUERY: Final = "SELECT formatQuerySingleLine({statement:String})"
