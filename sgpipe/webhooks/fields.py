"""Names of SendGrid's Webhooks API that the CLI needs before anything heavy is imported
(argparse choices and help): plain constants, no pydantic."""

from __future__ import annotations

from typing import Final

# The event toggles of the webhook object, in the seed's order. sgpipe stores every one of
# them, so `connect` turns all on unless told otherwise, and `check` reports any that is off.
EVENT_FIELDS: Final = (
    "group_resubscribe",
    "delivered",
    "group_unsubscribe",
    "spam_report",
    "bounce",
    "deferred",
    "unsubscribe",
    "processed",
    "open",
    "click",
    "dropped",
)
OAUTH_FIELDS: Final = ("oauth_client_id", "oauth_client_secret", "oauth_token_url")
# SendGrid's limit in every example of the seed (`max_allowed: 5`).
MAX_WEBHOOKS: Final = 5
INCLUDE_ACCOUNT_STATUS_CHANGE: Final = "account_status_change"
