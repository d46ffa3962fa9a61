"""The SendGrid Event Webhook ingress: verify, then publish the raw batch to Kafka."""
