"""I/O adapters for state (PostgreSQL) and artifacts (S3)."""
