"""SendGrid's Webhooks API: the Event Webhook settings behind `sgpipe webhooks ...`.

Layout: ``models`` (the API's payloads, pydantic), ``client`` (aiohttp, one method per
operation, one-line errors, the API key never shown), ``connect`` (`connect` and `check`: what
to change on SendGrid's side and in the config file), ``emulator`` (`sgpipe sendgrid-emulator`,
the same API served locally), ``command`` (the CLI). The operations are those of
schemas/sendgrid/event-webhooks-openapi.yaml; docs/webhooks-api.md explains the commands.
"""
