"""The payloads of SendGrid's Webhooks API (schemas/sendgrid/event-webhooks-openapi.yaml).

One set of pydantic models serves both sides: the client validates what a server answers, the
emulator validates what a client sends. Response models ignore unknown fields (SendGrid adds
fields over time; a client that broke on one would be fragile); request models forbid them,
which is what the emulator needs to answer a typo with a 400.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sgpipe.webhooks.fields import EVENT_FIELDS, MAX_WEBHOOKS


class EventWebhookRequest(BaseModel):
    """The body of create (POST .../settings) and update (PATCH .../settings/{id}): only
    ``url`` is required; an absent toggle keeps its value on update and is false on create."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    enabled: bool | None = None
    group_resubscribe: bool | None = None
    delivered: bool | None = None
    group_unsubscribe: bool | None = None
    spam_report: bool | None = None
    bounce: bool | None = None
    deferred: bool | None = None
    unsubscribe: bool | None = None
    processed: bool | None = None
    open: bool | None = None
    click: bool | None = None
    dropped: bool | None = None
    friendly_name: str | None = None
    oauth_client_id: str | None = None
    oauth_client_secret: str | None = None
    oauth_token_url: str | None = None

    def body(self) -> dict[str, object]:
        """The JSON body: fields set by the caller only (None is sent where it was set)."""
        return self.model_dump(exclude_unset=True)


class SignatureToggle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool


class EventWebhookTestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    id: str | None = None
    oauth_client_id: str | None = None
    oauth_client_secret: str | None = None
    oauth_token_url: str | None = None


class EventWebhook(BaseModel):
    """A webhook as SendGrid answers it (get, list, create, update)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = ""
    url: str = ""
    enabled: bool = False
    group_resubscribe: bool = False
    delivered: bool = False
    group_unsubscribe: bool = False
    spam_report: bool = False
    bounce: bool = False
    deferred: bool = False
    unsubscribe: bool = False
    processed: bool = False
    open: bool = False
    click: bool = False
    dropped: bool = False
    account_status_change: bool | None = None
    friendly_name: str | None = None
    oauth_client_id: str | None = None
    oauth_token_url: str | None = None
    # Present only while signature verification is on.
    public_key: str | None = None
    created_date: str | None = None
    updated_date: str | None = None

    @property
    def events(self) -> tuple[str, ...]:
        """The event types this webhook sends."""
        return tuple(name for name in EVENT_FIELDS if getattr(self, name))

    @property
    def signed(self) -> bool:
        return bool(self.public_key)


class EventWebhookList(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    max_allowed: int = MAX_WEBHOOKS
    webhooks: tuple[EventWebhook, ...] = ()

    def real(self) -> tuple[EventWebhook, ...]:
        # SendGrid's "Zero Webhooks" answer is `webhooks: [{}]`: an empty object, not a webhook.
        return tuple(webhook for webhook in self.webhooks if webhook.id)


class SignedPublicKey(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = ""
    # "" while signing is off.
    public_key: str = ""


class ApiErrorItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    message: str = ""
    id: str | None = None
    url: str | None = None
    field: str | None = None


class ApiErrorBody(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    errors: tuple[ApiErrorItem, ...] = ()
