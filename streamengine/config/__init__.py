"""Settings: pydantic-settings models (the only place that reads the environment) and their reference."""
