"""Kafka side: topics, ingest (faust), DLQ and the outbox relay."""
