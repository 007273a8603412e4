"""The `streamengine` command."""
