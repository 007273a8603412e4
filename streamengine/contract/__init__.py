"""The public contract: event models, CloudEvents headers, topic definitions and the generated files."""
