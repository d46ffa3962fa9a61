"""The CLI of `sgpipe webhooks ...` and `sgpipe sendgrid-emulator` (docs/webhooks-api.md).

Registered by ``add_commands``; the handlers import the client, aiohttp and ruamel.yaml only
when they run, so that other commands do not pay for them.

Exit codes: 0 done; 1 SendGrid refused or failed, a test batch was not accepted, or `check`
found a difference; 2 usage (no API key, a bad flag).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sgpipe.webhooks.fields import EVENT_FIELDS, INCLUDE_ACCOUNT_STATUS_CHANGE

if TYPE_CHECKING:
    from sgpipe.runtime.settings import Settings
    from sgpipe.webhooks.client import WebhooksClient
    from sgpipe.webhooks.models import EventWebhook

EXIT_FAILED = 1
EXIT_USAGE = 2
API_KEY_VARIABLE = "SENDGRID_API_KEY"
CONFIG_FILE_VARIABLE = "SGPIPE_CONFIG"
# How long `connect` waits for its test batch to show at the ingress.
DEFAULT_TEST_WAIT_SECONDS = 30.0

_T = TypeVar("_T")


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Register ``webhooks ...`` and ``sendgrid-emulator``; ``common`` holds the options every
    command takes (--config, --log-level, --log-format)."""
    api = argparse.ArgumentParser(add_help=False)
    group = api.add_argument_group("SendGrid API")
    group.add_argument(
        "--region",
        choices=["global", "eu"],
        help="api.sendgrid.com, or api.eu.sendgrid.com for EU regional subusers "
        "(default: sendgrid.region, global)",
    )
    group.add_argument(
        "--api-base-url",
        metavar="URL",
        help="another server, e.g. `sgpipe sendgrid-emulator` (default: sendgrid.api_base_url)",
    )
    group.add_argument(
        "--on-behalf-of",
        metavar="SUBUSER",
        help="act for this subuser (or 'account-id ID') (default: sendgrid.on_behalf_of)",
    )
    group.add_argument("--json", action="store_true", help="print JSON instead of a table")

    webhooks = commands.add_parser(
        "webhooks",
        help="SendGrid's Event Webhook settings: list, create, connect, check, ...",
        description="SendGrid's Webhooks API (v3 Event Webhook settings). The API key comes from "
        f"${API_KEY_VARIABLE} or sendgrid.api_key and is never printed. See docs/webhooks-api.md.",
    )
    actions = webhooks.add_subparsers(title="actions", required=True, metavar="ACTION")

    def action(name: str, handler: Callable[..., int], summary: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, parents=[common, api], help=summary, description=summary)
        parser.set_defaults(command=handler, serves_webhooks=False)
        return parser

    def add_include(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--include",
            choices=[INCLUDE_ACCOUNT_STATUS_CHANGE],
            help="also show account_status_change",
        )

    listing = action("list", _list, "list the Event Webhooks")
    add_include(listing)
    show = action("show", _show, "show one Event Webhook")
    show.add_argument("id", metavar="ID", help="the webhook's id (see `webhooks list`)")
    add_include(show)
    create = action("create", _create, "create an Event Webhook (signing is a separate step)")
    create.add_argument("--url", required=True, help="where SendGrid POSTs the events")
    _add_fields(create)
    update = action("update", _update, "change an Event Webhook's settings")
    update.add_argument("id", metavar="ID", help="the webhook's id (see `webhooks list`)")
    update.add_argument("--url", help="a new URL (default: keep it)")
    _add_fields(update)
    add_include(update)
    delete = action("delete", _delete, "delete an Event Webhook")
    delete.add_argument("id", metavar="ID", help="the webhook's id (see `webhooks list`)")
    sign = action("sign", _sign, "turn signature verification on or off")
    sign.add_argument("id", metavar="ID", help="the webhook's id (see `webhooks list`)")
    toggle = sign.add_mutually_exclusive_group(required=True)
    toggle.add_argument(
        "--enable", dest="enable", action="store_true", help="sign, with a new key pair"
    )
    toggle.add_argument("--disable", dest="enable", action="store_false", help="stop signing")
    public_key = action("public-key", _public_key, "print a signed webhook's public key")
    public_key.add_argument("id", metavar="ID", help="the webhook's id (see `webhooks list`)")
    test = action("test", _test, "ask SendGrid to POST a test batch")
    test.add_argument("id", metavar="ID", nargs="?", help="the webhook (its URL and OAuth)")
    test.add_argument("--url", help="where to send it (default: the webhook's URL)")
    _add_oauth(test)

    connect = action(
        "connect", _connect, "set SendGrid up for one sgpipe webhook, idempotently, and test it"
    )
    connect.add_argument("--name", required=True, help="the sgpipe webhook (webhooks[].name)")
    connect.add_argument(
        "--public-url", required=True, metavar="URL", help="https://HOST/webhooks/NAME"
    )
    connect.add_argument(
        "--events",
        type=_event_list,
        default=EVENT_FIELDS,
        help="comma-separated event types (default: all that sgpipe stores: "
        f"{','.join(EVENT_FIELDS)})",
    )
    connect.add_argument("--friendly-name", help="SendGrid's label (default: sgpipe NAME)")
    connect.add_argument(
        "--oauth",
        action="store_true",
        help="also make SendGrid fetch OAuth tokens from the ingress's /oauth/token with a new "
        "client (its secret's hash goes to the config)",
    )
    connect.add_argument(
        "--kubernetes-secret",
        metavar="SECRET",
        help="print this Secret with the public key instead of writing the config file",
    )
    connect.add_argument(
        "--ingress-url",
        metavar="URL",
        help="the running ingress whose /metrics shows the test batch "
        "(default: http://127.0.0.1:<ingest.port>)",
    )
    connect.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_TEST_WAIT_SECONDS,
        metavar="SECONDS",
        help=f"how long to wait for the test batch (default: {DEFAULT_TEST_WAIT_SECONDS:g})",
    )
    connect.add_argument("--skip-test", action="store_true", help="do not send a test batch")

    check = action(
        "check", _check, "compare SendGrid's webhooks with sgpipe's; exit 1 on a difference"
    )
    check.add_argument("--name", help="only this sgpipe webhook")
    check.add_argument(
        "--public-base-url",
        metavar="URL",
        help="https://HOST where SendGrid reaches the ingress (default: sendgrid.public_base_url)",
    )

    emulator = commands.add_parser(
        "sendgrid-emulator",
        parents=[common],
        help="serve SendGrid's Webhooks API locally, for tests and offline development",
        description="SendGrid's Event Webhook settings API on a local server: every operation "
        "of SendGrid's OpenAPI, its error bodies, at most 5 webhooks, on-behalf-of accounts, a "
        "P-256 key per signed webhook, and a test endpoint that POSTs a signed sample batch.",
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    emulator.add_argument("--port", type=int, default=3030, metavar="P", help="(default: 3030)")
    emulator.add_argument("--state", type=Path, metavar="FILE", help="keep webhooks in FILE")
    emulator.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept only these keys (repeatable; default: any bearer token)",
    )
    emulator.set_defaults(command=_emulator, serves_webhooks=False)


def _event_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in EVENT_FIELDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown event type(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(EVENT_FIELDS)}"
        )
    return names


def _add_fields(parser: argparse.ArgumentParser) -> None:
    fields = parser.add_argument_group("webhook fields (absent: SendGrid's default, or kept)")
    fields.add_argument(
        "--enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether SendGrid posts at all",
    )
    fields.add_argument("--events", type=_event_list, help="these event types on, every other off")
    for name in EVENT_FIELDS:
        fields.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"send (or not) {name} events",
        )
    fields.add_argument("--friendly-name", help="a label; SendGrid does not require it unique")
    _add_oauth(parser)


def _add_oauth(parser: argparse.ArgumentParser) -> None:
    oauth = parser.add_argument_group("OAuth (an empty string turns it off on update)")
    oauth.add_argument("--oauth-client-id", help="the client id SendGrid presents")
    oauth.add_argument(
        "--oauth-client-secret", help="its secret (SendGrid stores it and never shows it)"
    )
    oauth.add_argument("--oauth-token-url", help="where SendGrid gets its access token")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.enabled is not None:
        values["enabled"] = args.enabled
    if args.events is not None:
        values |= {name: name in args.events for name in EVENT_FIELDS}
    for name in EVENT_FIELDS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for name in ("friendly_name", "oauth_client_id", "oauth_client_secret", "oauth_token_url"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return values


# --- running an action ---------------------------------------------------------------------


def report_fatal(message: str, **fields: Any) -> None:
    from sgpipe.runtime.logs import report_fatal as report

    report(message, **fields)


class _Usage(Exception):
    """A usage problem: one line, exit 2."""


def _client(args: argparse.Namespace, settings: Settings) -> WebhooksClient:
    from pydantic import SecretStr

    from sgpipe.webhooks.client import WebhooksClient, base_url_for

    # SendGrid's own variable wins over the file: it is how their tools take the key.
    from_environment = os.environ.get(API_KEY_VARIABLE, "").strip()
    api_key = SecretStr(from_environment) if from_environment else settings.sendgrid.api_key
    if api_key is None or not api_key.get_secret_value():
        raise _Usage(f"no SendGrid API key: set {API_KEY_VARIABLE} or sendgrid.api_key")
    region = args.region or settings.sendgrid.region
    base = base_url_for(region, args.api_base_url or settings.sendgrid.api_base_url)
    return WebhooksClient(
        api_key, base, on_behalf_of=args.on_behalf_of or settings.sendgrid.on_behalf_of
    )


def _run(
    args: argparse.Namespace,
    settings: Settings,
    body: Callable[[WebhooksClient], Awaitable[int]],
) -> int:
    import asyncio

    from sgpipe.webhooks.client import SendGridApiError

    async def run() -> int:
        async with _client(args, settings) as client:
            return await body(client)

    try:
        return asyncio.run(run())
    except _Usage as exc:
        report_fatal(str(exc), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    except SendGridApiError as exc:
        print(f"sgpipe webhooks: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _emit(args: argparse.Namespace, document: Any, table: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=False))
    else:
        print(table())


def _dump(webhook: EventWebhook) -> dict[str, Any]:
    return webhook.model_dump(exclude_none=True)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _events_cell(webhook: EventWebhook) -> str:
    return "all" if len(webhook.events) == len(EVENT_FIELDS) else ",".join(webhook.events) or "-"


def _webhook_rows(webhooks: Sequence[EventWebhook]) -> str:
    rows = [
        (
            w.id,
            w.url,
            "yes" if w.enabled else "no",
            "yes" if w.signed else "no",
            "yes" if w.oauth_client_id else "no",
            _events_cell(w),
            w.friendly_name or "",
        )
        for w in webhooks
    ]
    if not rows:
        return "no Event Webhooks"
    return _table(rows, ("ID", "URL", "ENABLED", "SIGNED", "OAUTH", "EVENTS", "NAME"))


def _webhook_detail(webhook: EventWebhook) -> str:
    return _table(
        [
            (key, json.dumps(value) if not isinstance(value, str) else value)
            for key, value in _dump(webhook).items()
        ],
        ("FIELD", "VALUE"),
    )


# --- handlers ------------------------------------------------------------------------------


def _list(args: argparse.Namespace, settings: Settings) -> int:
    async def body(client: WebhooksClient) -> int:
        answer = await client.list(include_account_status_change=bool(args.include))
        webhooks = answer.real()
        _emit(
            args,
            {"max_allowed": answer.max_allowed, "webhooks": [_dump(w) for w in webhooks]},
            lambda: (
                _webhook_rows(webhooks) + f"\n({len(webhooks)} of at most {answer.max_allowed})"
            ),
        )
        return 0

    return _run(args, settings, body)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    async def body(client: WebhooksClient) -> int:
        webhook = await client.get(args.id, include_account_status_change=bool(args.include))
        _emit(args, _dump(webhook), lambda: _webhook_detail(webhook))
        return 0

    return _run(args, settings, body)


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from sgpipe.webhooks.models import EventWebhookRequest

    async def body(client: WebhooksClient) -> int:
        request = EventWebhookRequest.model_validate({"url": args.url, **_fields(args)})
        webhook = await client.create(request)
        _emit(args, _dump(webhook), lambda: f"created {webhook.id}\n" + _webhook_detail(webhook))
        return 0

    return _run(args, settings, body)


def _update(args: argparse.Namespace, settings: Settings) -> int:
    from sgpipe.webhooks.models import EventWebhookRequest

    async def body(client: WebhooksClient) -> int:
        # SendGrid's PATCH requires the URL: keep the current one unless a new one is given.
        url = args.url or (await client.get(args.id)).url
        request = EventWebhookRequest.model_validate({"url": url, **_fields(args)})
        webhook = await client.update(
            args.id, request, include_account_status_change=bool(args.include)
        )
        _emit(args, _dump(webhook), lambda: f"updated {webhook.id}\n" + _webhook_detail(webhook))
        return 0

    return _run(args, settings, body)


def _delete(args: argparse.Namespace, settings: Settings) -> int:
    async def body(client: WebhooksClient) -> int:
        await client.delete(args.id)
        _emit(args, {"deleted": args.id}, lambda: f"deleted {args.id}")
        return 0

    return _run(args, settings, body)


def _sign(args: argparse.Namespace, settings: Settings) -> int:
    async def body(client: WebhooksClient) -> int:
        answer = await client.set_signing(args.id, enabled=args.enable)
        state = "enabled" if args.enable else "disabled"
        _emit(
            args,
            answer.model_dump(),
            lambda: (
                f"signature verification {state} on {args.id}"
                + (f"\npublic key: {answer.public_key}" if answer.public_key else "")
            ),
        )
        return 0

    return _run(args, settings, body)


def _public_key(args: argparse.Namespace, settings: Settings) -> int:
    async def body(client: WebhooksClient) -> int:
        answer = await client.public_key(args.id)
        if not answer.public_key:
            print(
                f"sgpipe webhooks: webhook {args.id} is not signed; "
                f"`sgpipe webhooks sign {args.id} --enable` turns signing on",
                file=sys.stderr,
            )
            return EXIT_FAILED
        _emit(args, answer.model_dump(), lambda: answer.public_key)
        return 0

    return _run(args, settings, body)


def _test(args: argparse.Namespace, settings: Settings) -> int:
    from sgpipe.webhooks.models import EventWebhookTestRequest

    async def body(client: WebhooksClient) -> int:
        url = args.url
        oauth: dict[str, str] = {}
        if args.id and not url:
            webhook = await client.get(args.id)
            url = webhook.url
            if webhook.oauth_client_id and args.oauth_client_id is None:
                # Saved credentials: SendGrid pulls the secret itself (the seed's test page).
                oauth = {
                    "oauth_client_id": webhook.oauth_client_id,
                    "oauth_token_url": webhook.oauth_token_url or "",
                }
        if not url:
            raise _Usage("webhooks test needs an ID or --url")
        for name in ("oauth_client_id", "oauth_client_secret", "oauth_token_url"):
            if getattr(args, name) is not None:
                oauth[name] = getattr(args, name)
        await client.test(
            EventWebhookTestRequest.model_validate({"url": url, "id": args.id, **oauth})
        )
        _emit(args, {"tested": url}, lambda: f"SendGrid accepted the test request for {url}")
        return 0

    return _run(args, settings, body)


def _connect(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sgpipe.webhooks.connect import (
        connect_webhook,
        kubernetes_secret,
        read_outcomes,
        send_test,
        trust_key_in_config,
        watch_test_batch,
        webhook_name_of,
    )

    if webhook_name_of(args.public_url) != args.name:
        report_fatal(
            f"--public-url must end in /webhooks/{args.name} (the ingress's path for "
            f"webhook {args.name!r})",
            exit_code=EXIT_USAGE,
        )
        return EXIT_USAGE
    config_file: Path | None = args.config or (
        Path(os.environ[CONFIG_FILE_VARIABLE]) if os.environ.get(CONFIG_FILE_VARIABLE) else None
    )
    if config_file is None and args.kubernetes_secret is None:
        report_fatal(
            "webhooks connect needs --config FILE (or $SGPIPE_CONFIG) to write the public key "
            "to, or --kubernetes-secret NAME to print it as a Secret",
            exit_code=EXIT_USAGE,
        )
        return EXIT_USAGE
    ingress = (args.ingress_url or f"http://127.0.0.1:{settings.ingest.port}").rstrip("/")
    metrics_url = f"{ingress}/metrics"

    async def body(client: WebhooksClient) -> int:
        friendly = args.friendly_name or f"sgpipe {args.name}"
        result = await connect_webhook(client, args.public_url, args.events, friendly)
        report: dict[str, Any] = {
            "webhook": args.name,
            "sendgrid_id": result.webhook.id,
            "url": result.webhook.url,
            "changes": list(result.changes),
        }
        lines = [*result.changes]
        if args.kubernetes_secret:
            declared = settings.webhook(args.name)
            keys = list(declared.public_keys) if declared else []
            if result.public_key not in keys:
                keys.append(result.public_key)
            print(kubernetes_secret(args.kubernetes_secret, args.name, keys), end="")
        else:
            assert config_file is not None
            try:
                wrote = trust_key_in_config(config_file, args.name, result.public_key)
            except (OSError, ValueError) as exc:
                raise _Usage(f"cannot write the public key to {config_file}: {exc}") from exc
            if wrote:
                lines.append(f"wrote the public key to {config_file} (webhooks[{args.name}])")
                report["changes"].append(f"config:{config_file}")
        if args.oauth:
            lines += await _connect_oauth(args, settings, client, result.webhook, config_file)
            report["changes"] += [line for line in lines if line.startswith("oauth:")]
        if not report["changes"]:
            lines.append(f"nothing to change: {result.webhook.id} is set up for {args.name}")
        status = 0
        if not args.skip_test:
            try:
                before = await asyncio.to_thread(read_outcomes, metrics_url, args.name)
            except OSError as exc:
                before = None
                outcome_detail = f"cannot read the ingress's metrics at {metrics_url}: {exc}"
            if before is not None:
                await send_test(client, result.webhook)
                outcome = await watch_test_batch(metrics_url, args.name, before, args.wait)
                outcome_detail = outcome.detail
                report["test"] = {"arrived": outcome.arrived, "accepted": outcome.accepted}
                status = 0 if outcome.accepted else EXIT_FAILED
            else:
                report["test"] = {"arrived": False, "accepted": False}
                status = EXIT_FAILED
            report["test"]["detail"] = outcome_detail
            lines.append(f"test batch: {outcome_detail}")
        if args.kubernetes_secret:
            # stdout carries the Secret alone, so that it can be piped to `kubectl apply -f -`.
            with contextlib.redirect_stdout(sys.stderr):
                _emit(args, report, lambda: "\n".join(lines))
        else:
            _emit(args, report, lambda: "\n".join(lines))
        return status

    return _run(args, settings, body)


async def _connect_oauth(
    args: argparse.Namespace,
    settings: Settings,
    client: WebhooksClient,
    webhook: EventWebhook,
    config_file: Path | None,
) -> list[str]:
    """``connect --oauth``: SendGrid fetches tokens from the ingress's built-in endpoint with a
    client the ingress knows; the new client's hash goes to the config file (or a Secret)."""
    from sgpipe.oauth_command import add_client_to_file
    from sgpipe.oauth_command import kubernetes_secret as oauth_secret
    from sgpipe.webhooks.connect import connect_oauth, token_url_for

    declared = settings.webhook(args.name)
    known = [c.client_id for c in declared.oauth_clients] if declared is not None else []
    token_url = token_url_for(args.public_url)
    done = await connect_oauth(client, webhook, token_url, known)
    if done.client_id is None or done.secret_hash is None:
        return []
    entry = {"client_id": done.client_id, "secret_hash": done.secret_hash}
    if args.kubernetes_secret:
        clients = [{"client_id": c, "secret_hash": h} for c, h in _declared_clients(declared)]
        print(oauth_secret(f"{args.kubernetes_secret}-oauth", args.name, [*clients, entry]), end="")
        where = f"the Secret {args.kubernetes_secret}-oauth printed above"
    else:
        assert config_file is not None
        add_client_to_file(config_file, args.name, entry)
        where = f"{config_file} (webhooks[{args.name}].oauth_clients, the secret's hash only)"
    return [
        f"oauth: SendGrid now fetches tokens from {token_url} as client {done.client_id}",
        f"oauth: the client is in {where}; restart the ingress to accept its tokens "
        "(set auth: both on the webhook to require them)",
    ]


def _declared_clients(declared: Any) -> list[tuple[str, str]]:
    if declared is None:
        return []
    return [(c.client_id, c.secret_hash) for c in declared.oauth_clients]


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from sgpipe.webhooks.connect import check_webhooks

    declared = [w for w in settings.webhooks if args.name is None or w.name == args.name]
    if args.name is not None and not declared:
        report_fatal(f"webhooks check: no webhook named {args.name!r} is declared", exit_code=2)
        return EXIT_USAGE

    async def body(client: WebhooksClient) -> int:
        on_file = (await client.list()).real()
        base = args.public_base_url or settings.sendgrid.public_base_url
        results = check_webhooks(declared, on_file, base)
        if args.name is not None:
            results = [result for result in results if result.name == args.name]
        rows = [
            (r.name, r.sendgrid_id or "-", "ok" if r.ok else "; ".join(r.differences))
            for r in results
        ]
        _emit(
            args,
            {"ok": all(r.ok for r in results), "webhooks": [r.to_dict() for r in results]},
            lambda: _table(rows, ("WEBHOOK", "SENDGRID ID", "STATE")) if rows else "no webhooks",
        )
        return 0 if all(r.ok for r in results) else EXIT_FAILED

    return _run(args, settings, body)


def _emulator(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import signal

    from sgpipe.webhooks.emulator import EmulatorConfig, EmulatorState, serve

    state = EmulatorState.load(args.state)
    config = EmulatorConfig(api_keys=frozenset(args.api_key))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(state, config, args.host, args.port, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        report_fatal(
            f"sendgrid-emulator: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            exit_code=2,
        )
        return EXIT_USAGE
    return 0
