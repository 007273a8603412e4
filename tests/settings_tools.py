"""Settings on the test services with names of their own: the builder behind the ``make_settings`` fixture,
also used by module-scoped engines. Light on imports, since conftest.py loads it for every run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamengine.config.settings import ENV_PREFIX, Settings, load_settings
from streamengine.local.embedded import free_port


def clear_environment(patch: pytest.MonkeyPatch) -> None:
    """Remove every STREAMENGINE_* variable (the config file's path too), so only the test's settings count."""
    for var in [v for v in os.environ if v.startswith(ENV_PREFIX)]:
        patch.delenv(var)


def settings_factory(services: Any, dsn: str, workdir: Path) -> Callable[..., Settings]:
    """Factory of :class:`Settings` on ``services`` and the database ``dsn``, with names unique to it.

    Keyword arguments override whole fields or, given a dict, fields of a nested section:
    ``make(window={"max_samples": 10})``. Settings from one factory share topics, group, bucket,
    database and ports, so settings made for two processes of one test see each other.
    """
    suffix = uuid.uuid4().hex[:10]
    api_port, metrics_port = free_port(), free_port()

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": services.kafka_bootstrap,
                "feedback_topic": f"feedback.events.{suffix}",
                "dlq_topic": f"feedback.events.dlq.{suffix}",
                "released_topic": f"adapter.released.{suffix}",
                "canary_topic": f"adapter.canary.{suffix}",
                "status_topic": f"adapter.status.{suffix}",
                "group_id": f"streamengine-ingest-{suffix}",
                "session_timeout_s": 6.0,
                "rebalance_timeout_s": 6.0,
            },
            "database": {"url": dsn},
            "storage": {
                "endpoint": services.s3_endpoint,
                "access_key": services.s3_access_key,
                "secret_key": services.s3_secret_key,
                "bucket": f"se-test-{suffix}",
            },
            "worker": {"work_dir": workdir / "work"},
            # Self anchors where a test asks for them (the tiny random model cannot write prompts; a build of
            # 256 samples costs a minute): tests/test_anchor_store.py, tests/test_gate_release.py.
            "learning": {"self_anchor": {"enabled": False}},
            "serving": {"download_dir": workdir / "adapters"},
            "api": {"port": api_port},
            "metrics": {"port": metrics_port},
            # Every node at once unless a test is about canaries (tests/test_rollout_*.py).
            "rollout": {"canary_fraction": 0.0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(fields.get(key), dict):
                fields[key] = {**fields[key], **value}
            else:
                fields[key] = value
        return load_settings(**fields)

    return make


def module_settings(services: Any, dsn: str, workdir: Path, **overrides: Any) -> Settings:
    """Settings for a module-scoped engine on a database of its own; topics of 2 partitions unless told."""
    kafka = {"partitions": 2, **overrides.pop("kafka", {})}
    return settings_factory(services, dsn, workdir)(kafka=kafka, **overrides)
