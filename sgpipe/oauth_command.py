"""``sgpipe oauth client create`` and ``sgpipe oauth key create``: credentials for the
ingress's built-in token endpoint (``POST /oauth/token``, ingest/oauth.py).

A client's secret is printed once and never stored: the config file (or the Kubernetes Secret)
holds its scrypt hash. With ``--config`` the client is added to the webhook in that file by a
round-trip edit (ruamel.yaml), so comments, order and quoting of the rest of the file stay.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgpipe.runtime.settings import Settings

EXIT_OK = 0
SECRET_KEY_CLIENTS = "oauth-clients"
SECRET_KEY_SIGNING_KEY = "signing-key.pem"


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Register ``oauth client create`` and ``oauth key create``."""
    oauth = commands.add_parser(
        "oauth",
        help="credentials for the ingress's OAuth token endpoint",
        description="Clients and signing keys of the built-in token endpoint POST /oauth/token "
        "(see docs/ingress.md, OAuth 2.0).",
    )
    kinds = oauth.add_subparsers(title="objects", required=True, metavar="OBJECT")
    client = kinds.add_parser("client", help="OAuth clients (one per SendGrid webhook)")
    client_actions = client.add_subparsers(title="actions", required=True, metavar="ACTION")
    create = client_actions.add_parser(
        "create",
        parents=[common],
        help="make a client for a webhook; print its id and secret once",
        description="Make a client id and secret for WEBHOOK's token endpoint. With --config, "
        "add the client (id and the secret's scrypt hash, never the secret) to that webhook in "
        "FILE, keeping the rest of the file; otherwise print the Kubernetes Secret that holds "
        "it. The secret is printed once: give it to SendGrid as oauth_client_secret.",
    )
    create.add_argument("--webhook", required=True, metavar="NAME")
    create.add_argument(
        "--json", action="store_true", help="print {client_id, client_secret, token_url}"
    )
    create.add_argument(
        "--token-url",
        metavar="URL",
        help="the public URL of POST /oauth/token, for SendGrid's oauth_token_url "
        "(default: http://localhost:<ingest.port>/oauth/token)",
    )
    create.add_argument(
        "--secret-name",
        default="sgpipe-oauth",
        metavar="NAME",
        help="the Kubernetes Secret's name when no --config is given (default: sgpipe-oauth)",
    )
    create.set_defaults(command=client_create, serves_webhooks=False)

    key = kinds.add_parser("key", help="signing keys of the token endpoint")
    key_actions = key.add_subparsers(title="actions", required=True, metavar="ACTION")
    key_create = key_actions.add_parser(
        "create",
        parents=[common],
        help="write a new ES256 signing key (PEM, mode 0600)",
        description="Write a new P-256 private key for ingest.oauth_signing_key_files. To "
        "rotate: list the new file second on every replica, then first, then drop the old one.",
    )
    key_create.add_argument("--out", type=Path, required=True, metavar="FILE")
    key_create.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    key_create.set_defaults(command=key_create_command, serves_webhooks=False)


def client_create(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.oauth import hash_client_secret, new_client_credentials
    from sgpipe.runtime.settings import ConfigError

    webhook = settings.webhook(args.webhook)
    if webhook is None:
        declared = ", ".join(w.name for w in settings.webhooks) or "none"
        raise ConfigError(f"--webhook: no webhook named {args.webhook!r} (declared: {declared})")
    client_id, secret = new_client_credentials()
    entry = {"client_id": client_id, "secret_hash": hash_client_secret(secret)}
    token_url = args.token_url or f"http://localhost:{settings.ingest.port}/oauth/token"
    if args.config is not None:
        add_client_to_file(args.config, webhook.name, entry)
    if args.json:
        print(json.dumps({"client_id": client_id, "client_secret": secret, "token_url": token_url}))
    else:
        print(f"client_id:     {client_id}")
        print(f"client_secret: {secret}")
        print(f"token_url:     {token_url}")
        print(
            "# The secret is shown once: give all three to SendGrid (oauth_client_id, "
            "oauth_client_secret, oauth_token_url).",
            file=sys.stderr,
        )
    if args.config is not None:
        if not webhook.accepts_tokens:
            print(
                f"# Added to webhooks[{webhook.name}] in {args.config}. Set its auth to token "
                "(or both) once SendGrid has the client, and restart the ingress.",
                file=sys.stderr,
            )
        if not settings.ingest.oauth_signing_key_files and not settings.ingest.oauth_signing_keys:
            print(
                "# The token endpoint needs a signing key: sgpipe oauth key create --out FILE, "
                "then ingest.oauth_signing_key_files: [FILE].",
                file=sys.stderr,
            )
    elif not args.json:
        clients = [
            {"client_id": c.client_id, "secret_hash": c.secret_hash} for c in webhook.oauth_clients
        ]
        clients.append(entry)
        print(kubernetes_secret(args.secret_name, webhook.name, clients))
    return EXIT_OK


def kubernetes_secret(name: str, webhook: str, clients: list[dict[str, str]]) -> str:
    """A Secret manifest holding a webhook's client list (hashes only), for the chart's
    ``webhooks[].oauthClientsSecret`` (it becomes SGPIPE_WEBHOOKS__<NAME>__OAUTH_CLIENTS)."""
    value = base64.b64encode(json.dumps(clients).encode()).decode()
    return (
        "# kubectl apply -f - ; then set webhooks[].oauthClientsSecret in the chart's values:\n"
        f"#   {{name: {name}, key: {SECRET_KEY_CLIENTS}}} for webhook {webhook}\n"
        "apiVersion: v1\n"
        "kind: Secret\n"
        "metadata:\n"
        f"  name: {name}\n"
        "type: Opaque\n"
        "data:\n"
        f"  {SECRET_KEY_CLIENTS}: {value}\n"
    )


def add_client_to_file(path: Path, webhook: str, entry: dict[str, str]) -> None:
    """Append ``entry`` to ``webhooks[<webhook>].oauth_clients`` in the YAML file, keeping
    comments and everything else; replaced atomically with the file's mode."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.util import load_yaml_guess_indent

    from sgpipe.runtime.settings import ConfigError

    text = path.read_text(encoding="utf-8")
    # The file's own indentation ("  - name" or "- name"), so that only the new lines change.
    _, sequence_indent, dash_offset = load_yaml_guess_indent(text)
    sequence_indent = sequence_indent or 2
    dash_offset = dash_offset or 0
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long hash or key onto a second line
    yaml.indent(
        mapping=max(2, sequence_indent - dash_offset), sequence=sequence_indent, offset=dash_offset
    )
    document: Any = yaml.load(text)
    webhooks = document.get("webhooks") if isinstance(document, dict) else None
    found = None
    for item in webhooks or ():
        if isinstance(item, dict) and item.get("name") == webhook:
            found = item
    if found is None:
        raise ConfigError(
            f"--config: {path} declares no webhook named {webhook!r} (it may come from "
            "SGPIPE_WEBHOOKS); add the client there by hand"
        )
    clients = found.get("oauth_clients")
    if clients is None:
        clients = CommentedSeq()
        found["oauth_clients"] = clients
    elif not isinstance(clients, list):
        raise ConfigError(f"--config: webhooks[{webhook}].oauth_clients in {path} is not a list")
    clients.append(CommentedMap(entry))
    mode = path.stat().st_mode & 0o777
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as out:
        yaml.dump(document, out)
        temporary = Path(out.name)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def key_create_command(args: argparse.Namespace, settings: Settings) -> int:
    write_signing_key(args.out, force=args.force)
    print(str(args.out))
    return EXIT_OK


def write_signing_key(path: Path, *, force: bool = False) -> None:
    """A new ES256 key to ``path``, mode 0600 from its creation (never readable by others).

    Written whole under a temporary name, then put in place in one step: an ingress starting
    at that moment reads the old key or the new one, never half a file (a replaced key, with
    ``force``, is how a leaked one is revoked on a live data dir)."""
    import secrets

    from ingest.oauth import generate_signing_key_pem
    from sgpipe.runtime.settings import ConfigError

    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask
            out.write(generate_signing_key_pem())
            out.flush()
            os.fsync(out.fileno())
        if force:
            os.replace(temporary, path)
        else:
            try:
                # link(), unlike rename(), fails if the name exists: never overwritten silently.
                os.link(temporary, path)
            except FileExistsError as exc:
                raise ConfigError(f"--out: {path} exists; pass --force to overwrite it") from exc
    finally:
        temporary.unlink(missing_ok=True)
