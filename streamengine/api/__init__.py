"""The admin HTTP API (routers by concern), its models and its client."""
