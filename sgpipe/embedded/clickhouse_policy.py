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

2. **The engine's syntax tree** (`check_statement`). A few ways out are not access-controlled
   in local mode: the scalar function `file()`, `INTO OUTFILE`, `FROM INFILE`, `disk(...)` and
   `disk`/`storage_policy` in a table's settings, and chdb's own table functions (`python`,
   `eval`, `filesystem`, ...). So each statement is parsed by the engine itself
   (`parseQueryToJSON`: its syntax tree as JSON; multi-statements are a syntax error) and the
   tree is checked here (after the engine confirmed that the canonical text it formats parses
   to the same tree) -- the root's statement kind and table functions against allowlists,
   storage engines against an allowlist, table settings and a short list of scalar functions
   against denylists, no INTO OUTFILE/FROM INFILE node -- and then that canonical text, not
   the client's, is what runs. A column named
   `engine`, `url` or `file` is an Identifier node, never a clause or a call. The few
   statement kinds the JSON form lacks (DESCRIBE, EXISTS, SHOW CREATE) are read from the
   engine's `EXPLAIN AST` and may name a table, nothing else. Anything unreadable is refused.
   The engine's grants do not cover system tables in local mode, so the few no user may
   read (`DENIED_TABLES`) are refused by name here.

The reader user additionally runs every request with `readonly = 2` (see the HTTP layer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
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


# --- layer 2: statements, checked on the engine's own syntax tree ----------------------------

# Table functions that only compute; every other one (and any a newer engine adds) is refused.
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
        "format",
    }
)
# Scalar functions that reach the file system or the network without an access check in
# local mode (`file` reads any path), or that are no function but create a disk on the spot.
DENIED_SCALAR_FUNCTIONS: Final = frozenset({"file", "disk", "catboostevaluate"})
# The LLM-calling functions (also off by a locked setting).
_AI_FUNCTION = re.compile(r"^(?:ai|AI)[A-Z]")
# Table settings that pick where a table's data lives (a disk, a storage policy, a
# coordination path): only the engine's default disk exists here.
DENIED_TABLE_SETTINGS: Final = frozenset({"disk", "storage_policy", "table_disk"})
_DENIED_TABLE_SETTING_PARTS: Final = ("zookeeper", "remote_fs")
_ALLOWED_ENGINES: Final = frozenset(name.lower() for name in (*TABLE_ENGINES, *DATABASE_ENGINES))
# System tables no user reads: the stack of every engine thread (with the statements running
# and addresses). In local mode the engine lets anyone read system tables whatever the grants
# say (a REVOKE is loaded and ignored), so the check refuses the name -- in any database, as
# the `database` parameter may make `system` the current one.
DENIED_TABLES: Final = frozenset({"stack_trace"})

# Statement kinds, by the type of the tree's root node, and how a refusal names them.
_READ_STATEMENTS: Final = {
    "SelectWithUnionQuery": "SELECT",
    "ShowTablesQuery": "SHOW",
    "ShowColumnsQuery": "SHOW COLUMNS",
    "ShowIndexesQuery": "SHOW INDEXES",
    "ExplainQuery": "EXPLAIN",
    "SetQuery": "SET",
    "UseQuery": "USE",
    "DescribeQuery": "DESCRIBE",
    "ExistsTableQuery": "EXISTS",
    "ExistsDatabaseQuery": "EXISTS",
    "ExistsViewQuery": "EXISTS",
    "ShowCreateTableQuery": "SHOW CREATE",
    "ShowCreateViewQuery": "SHOW CREATE",
    "ShowCreateDatabaseQuery": "SHOW CREATE",
    "ShowGrantsQuery": "SHOW GRANTS",
    "ShowEngineQuery": "SHOW ENGINES",
    "ShowFunctions": "SHOW FUNCTIONS",
    "ShowSetting": "SHOW SETTING",
}
_WRITE_STATEMENTS: Final = {
    **_READ_STATEMENTS,
    "InsertQuery": "INSERT",
    "CreateQuery": "CREATE",
    "AlterQuery": "ALTER",
    "DropQuery": "DROP",
    "OptimizeQuery": "OPTIMIZE",
    "RenameQuery": "RENAME",
    "DeleteQuery": "DELETE",
    "UpdateQuery": "UPDATE",
    "CheckTableQuery": "CHECK",
}
# The statements that answer with a result set (and so take an output format).
_ROW_STATEMENTS: Final = frozenset(
    set(_READ_STATEMENTS) - {"SetQuery", "UseQuery"} | {"CheckTableQuery"}
)
# Statements `parseQueryToJSON` cannot serialize in this engine version. They are read from
# `EXPLAIN AST` instead, where every node's type starts its line; such a statement may name
# a table and settings, nothing else -- no function, subquery or literal (so no table
# function and no INTO OUTFILE). An identifier containing a newline can only add lines, and
# a line whose type is not listed is refused.
_EXPLAINED_STATEMENTS: Final = frozenset(
    {
        "DescribeQuery",
        "ExistsTableQuery",
        "ExistsDatabaseQuery",
        "ExistsViewQuery",
        "ShowCreateTableQuery",
        "ShowCreateViewQuery",
        "ShowCreateDatabaseQuery",
        "ShowGrantsQuery",
        "ShowEngineQuery",
        "ShowFunctions",
        "ShowSetting",
    }
)
_EXPLAINED_PARTS: Final = frozenset({"TableExpression", "TableIdentifier", "Identifier", "Set"})
_EXPLAIN_LINE = re.compile(r"^ *([A-Za-z_]+)")
_TRAILING_FORMAT = re.compile(r" FORMAT ([A-Za-z_][A-Za-z0-9_]*)$")

# The tree without the flag that only says how an expression was written (`a ? b : c` and
# `x::T` format back as `if(a, b, c)` and `CAST(x, 'T')`). A JSON key never matches inside a
# string value: there its quotes are escaped.
_SAME_TREE: Final = "replaceRegexpAll({tree}, ',\"is_operator\":(?:true|false)', '')"
# What the HTTP layer asks the engine, on the request's own handle (so the parser sees the
# request's settings): the statement's syntax tree as JSON, whether the canonical text parses
# to that very tree, and the canonical text, which is what runs. One round trip; the JSON has
# no raw newline. (Formatting back from the JSON instead fails on some trees -- a `disk(...)`
# setting -- with an engine error before the check could say why it is refused.)
STATEMENT_TREE_QUERY: Final = (
    "WITH parseQueryToJSON({statement:String}) AS tree, "
    "formatQuerySingleLine({statement:String}) AS canonical, "
    f"{_SAME_TREE.format(tree='parseQueryToJSON(canonical)')} = {_SAME_TREE.format(tree='tree')}"
    " AS same_tree "
    "SELECT concat(tree, '\\n', toString(same_tree), '\\n', canonical)"
)
# For the statements the JSON form does not cover: the canonical text, then its EXPLAIN AST.
CANONICAL_QUERY: Final = "SELECT formatQuerySingleLine({statement:String})"
_NOT_SERIALIZABLE = "does not support JSON serialization"


class StatementDenied(Exception):
    """The statement does something no user of the embedded store may do."""


@dataclass(frozen=True, slots=True)
class StatementPolicy:
    denied_functions: frozenset[str]  # lower-case names

    @classmethod
    def from_engine(
        cls, table_functions: Iterable[str], functions: Iterable[str]
    ) -> StatementPolicy:
        """The policy for this engine build: every table function it has but the safe ones
        (as a scalar call too), the denied scalar functions, and the AI functions it has."""
        denied = {name.lower() for name in table_functions} - SAFE_TABLE_FUNCTIONS
        denied |= DENIED_SCALAR_FUNCTIONS
        denied |= {name.lower() for name in functions if _AI_FUNCTION.match(name)}
        return cls(frozenset(denied))


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement as the engine parsed it: its syntax tree and the text that runs."""

    kind: str  # the root node's type, e.g. "SelectWithUnionQuery"
    canonical: str  # formatted by the engine; parses to the checked tree; what runs
    tree: dict[str, Any] | None  # parseQueryToJSON's tree; None for _EXPLAINED_STATEMENTS
    explained: tuple[str, ...] = ()  # their EXPLAIN AST lines

    @classmethod
    def from_tree_answer(cls, answer: str) -> Statement:
        """From the answer to STATEMENT_TREE_QUERY."""
        tree_json, same_tree, canonical = answer.rstrip("\n").split("\n", 2)
        if same_tree != "1":
            raise StatementDenied("the statement's canonical form parses to another tree")
        try:
            tree = json.loads(tree_json)
        except (ValueError, RecursionError) as exc:
            raise StatementDenied("the statement's syntax tree could not be read") from exc
        if not isinstance(tree, dict) or not isinstance(tree.get("type"), str):
            raise StatementDenied("the statement's syntax tree could not be read")
        return cls(tree["type"], canonical, tree)

    @classmethod
    def from_explain(cls, canonical: str, explain_ast: str) -> Statement:
        """From a canonical statement and the engine's EXPLAIN AST of it."""
        lines = tuple(line for line in explain_ast.splitlines() if line.strip())
        root = _EXPLAIN_LINE.match(lines[0]) if lines else None
        if root is None:
            raise StatementDenied("the statement's syntax tree could not be read")
        return cls(root.group(1), canonical, None, lines)

    @property
    def returns_rows(self) -> bool:
        return self.kind in _ROW_STATEMENTS

    @property
    def output_format(self) -> str | None:
        """The statement's own FORMAT clause, if it has one."""
        if self.tree is None:
            match = _TRAILING_FORMAT.search(self.canonical)
            return match.group(1) if match else None
        format_ast = self.tree.get("format_ast")
        if isinstance(format_ast, dict) and isinstance(format_ast.get("name"), str):
            return str(format_ast["name"])
        return None

    @property
    def insert_format(self) -> str | None:
        """An INSERT's FORMAT (VALUES is format Values): its data follows the statement."""
        if self.kind != "InsertQuery" or self.tree is None:
            return None
        fmt = self.tree.get("format")
        return fmt if isinstance(fmt, str) and fmt else None


def is_not_serializable(error: BaseException) -> bool:
    """Did STATEMENT_TREE_QUERY fail only because the JSON form lacks this statement kind?"""
    return _NOT_SERIALIZABLE in str(error)


def check_statement(
    statement: Statement,
    policy: StatementPolicy,
    *,
    readonly: bool,
    parameters: Mapping[str, str] | None = None,
) -> None:
    """Raise StatementDenied unless ``statement`` stays inside the data path.

    ``readonly``: the read-only allowlist of statement kinds (reads and SET only).
    ``parameters``: the values bound to the statement's `{name:Type}` placeholders.
    """
    _check_kind(statement.kind, readonly=readonly)
    if statement.tree is None:
        _check_explained(statement)
        return
    if statement.kind == "ExplainQuery":
        inner = statement.tree.get("query")
        _check_kind(inner.get("type") if isinstance(inner, dict) else None, readonly=readonly)
    _check_object(statement.tree)
    for key, node in _nodes(statement.tree):
        if "out_file" in node or node.get("is_into_outfile_with_stdout"):
            raise StatementDenied("INTO OUTFILE is not allowed: results go to the client")
        if "infile" in node:
            raise StatementDenied("FROM INFILE is not allowed: send the data in the request")
        node_type = node.get("type")
        if node_type == "Function":
            _check_function(key, node, policy)
        elif node_type == "SetQuery":
            _check_settings(node)
        elif node_type == "TableIdentifier":
            _check_table(node, parameters or {})
        elif node_type == "Identifier" and _names_denied_table(str(node.get("name", ""))):
            # A table where an expression goes: `x IN system.stack_trace`, joinGet(t, ...).
            raise StatementDenied(f"the system table {node.get('name')} is not readable here")


def _check_kind(kind: object, *, readonly: bool) -> None:
    allowed = _READ_STATEMENTS if readonly else _WRITE_STATEMENTS
    if not isinstance(kind, str) or kind not in allowed:
        name = _WRITE_STATEMENTS.get(str(kind), str(kind))
        who = "the read-only user" if readonly and kind in _WRITE_STATEMENTS else "any user"
        raise StatementDenied(f"{name} statements are not allowed for {who}")


def _nodes(tree: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every node of the tree with the key it hangs under (iteratively: trees are deep)."""
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            yield key, value
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, item) for item in value)


def _check_object(tree: dict[str, Any]) -> None:
    kind = tree["type"]
    if kind == "CreateQuery" and (
        tree.get("is_dictionary") or tree.get("attach") or tree.get("has_attach_from_path")
    ):
        raise StatementDenied(
            "CREATE is allowed for tables, views and databases only (no dictionaries, no ATTACH)"
        )
    if kind == "DropQuery" and (
        tree.get("kind") not in ("Drop", "Truncate") or tree.get("is_dictionary")
    ):
        raise StatementDenied("DROP is allowed for tables, views and databases only")
    if kind == "RenameQuery" and tree.get("dictionary"):
        raise StatementDenied("RENAME is allowed for tables, views and databases only")


def _check_function(key: str, node: dict[str, Any], policy: StatementPolicy) -> None:
    name = node.get("name")
    if not isinstance(name, str):
        raise StatementDenied("a function this server cannot read")
    lower = name.lower()
    if node.get("kind") in ("TABLE_ENGINE", "DATABASE_ENGINE") or key == "engine":
        if lower not in _ALLOWED_ENGINES:
            raise StatementDenied(
                f"ENGINE = {name} is not allowed; allowed: "
                + ", ".join((*TABLE_ENGINES, *DATABASE_ENGINES))
            )
    elif key in ("table_function", "as_table_function"):
        if lower not in SAFE_TABLE_FUNCTIONS:
            raise StatementDenied(f"{lower}() reaches outside the store and is not allowed")
    elif lower in policy.denied_functions:
        raise StatementDenied(f"{lower}() reaches outside the store and is not allowed")


def _check_table(node: dict[str, Any], parameters: Mapping[str, str]) -> None:
    names = [node.get("name")]
    for part in node.get("children") or ():
        if isinstance(part, dict) and part.get("type") == "QueryParameter":
            names.append(parameters.get(str(part.get("name")), ""))
    for name in names:
        if _names_denied_table(str(name or "")):
            raise StatementDenied(f"the system table {name} is not readable here")


def _names_denied_table(name: str) -> bool:
    return name.rsplit(".", 1)[-1].strip('`"').lower() in DENIED_TABLES


def _check_settings(node: dict[str, Any]) -> None:
    for change in node.get("changes") or ():
        name = change.get("name") if isinstance(change, dict) else None
        if not isinstance(name, str):
            raise StatementDenied("a SETTINGS clause this server cannot read")
        if name in DENIED_TABLE_SETTINGS or any(p in name for p in _DENIED_TABLE_SETTING_PARTS):
            raise StatementDenied(
                f"SETTINGS {name} is not allowed: tables keep their data on the default disk"
            )


def _check_explained(statement: Statement) -> None:
    if statement.kind not in _EXPLAINED_STATEMENTS:
        raise StatementDenied("a statement this server cannot read")
    for line in statement.explained[1:]:
        part = _EXPLAIN_LINE.match(line)
        if part is None or part.group(1) not in _EXPLAINED_PARTS:
            raise StatementDenied(
                f"{_WRITE_STATEMENTS[statement.kind]} may name a table and settings only"
            )


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
