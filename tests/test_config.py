"""Settings: the contract's defaults, the public environment names, YAML files and error messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamengine.config.settings import CONFIG_ENV, ENV_PREFIX, Settings, env_name, load_settings
from streamengine.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No STREAMENGINE_* variable leaks in."""
    for var in [v for v in os.environ if v.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_follow_the_contract() -> None:
    s = load_settings()
    assert (s.lora.r, s.lora.alpha, s.lora.dropout) == (16, 32, 0.05)
    assert s.lora.target_modules == ["q_proj", "v_proj", "up_proj", "down_proj"]
    assert s.ewc.lambda_ == 500.0
    assert 100 <= s.ewc.lambda_ <= 1000
    assert (s.training.batch_size, s.training.learning_rate, s.training.epochs) == (4, 2e-4, 3)
    assert s.training.max_length == 2048
    assert s.window.schedule == "0 2 * * 1"
    assert s.storage.bucket == "lora-adapters"
    assert (s.kafka.feedback_topic, s.kafka.dlq_topic, s.kafka.released_topic) == (
        "feedback.events",
        "feedback.events.dlq",
        "adapter.released",
    )
    assert s.storage.secure is False
    assert s.signing_key is None


def test_defaults_are_not_shared_between_instances() -> None:
    first = load_settings()
    first.lora.target_modules.append("gate_proj")
    assert load_settings().lora.target_modules == ["q_proj", "v_proj", "up_proj", "down_proj"]


def test_public_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "STREAMENGINE_KAFKA__BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
        "STREAMENGINE_DATABASE__URL": "postgresql://se:pw@db:5432/se",
        "STREAMENGINE_STORAGE__ENDPOINT": "minio:9000",
        "STREAMENGINE_STORAGE__ACCESS_KEY": "AKIA",
        "STREAMENGINE_STORAGE__SECRET_KEY": "sk",
        "STREAMENGINE_STORAGE__BUCKET": "adapters-prod",
        "STREAMENGINE_STORAGE__SECURE": "true",
        "STREAMENGINE_MODEL__NAME": "llama-3-8b",
        "STREAMENGINE_MODEL__BASE": "/models/llama",
        "STREAMENGINE_WINDOW__MAX_SAMPLES": "250",
        "STREAMENGINE_WINDOW__MAX_WEIGHT": "12.5",
        "STREAMENGINE_WINDOW__SCHEDULE": "30 3 * * 0",
        "STREAMENGINE_EWC__LAMBDA": "750",
        "STREAMENGINE_TRAINING__EPOCHS": "5",
        "STREAMENGINE_METRICS__PORT": "9191",
        "STREAMENGINE_SIGNING_KEY": "sign-me",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert s.database.url.get_secret_value() == "postgresql://se:pw@db:5432/se"
    assert s.storage.endpoint == "minio:9000"
    assert s.storage.access_key.get_secret_value() == "AKIA"
    assert s.storage.secret_key.get_secret_value() == "sk"
    assert (s.storage.bucket, s.storage.secure) == ("adapters-prod", True)
    assert (s.model.name, s.model.base) == ("llama-3-8b", "/models/llama")
    assert (s.window.max_samples, s.window.max_weight, s.window.schedule) == (250, 12.5, "30 3 * * 0")
    assert s.ewc.lambda_ == 750.0
    assert s.training.epochs == 5
    assert s.metrics.port == 9191
    assert s.signing_key is not None and s.signing_key.get_secret_value() == "sign-me"


@pytest.mark.parametrize(("text", "value"), [("false", False), ("true", True), ("0", False), ("1", True)])
def test_storage_secure_flag(monkeypatch: pytest.MonkeyPatch, text: str, value: bool) -> None:
    monkeypatch.setenv("STREAMENGINE_STORAGE__SECURE", text)
    assert load_settings().storage.secure is value


def test_list_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_LORA__TARGET_MODULES", '["q_proj", "v_proj"]')
    assert load_settings().lora.target_modules == ["q_proj", "v_proj"]


YAML = """\
kafka:
  bootstrap_servers: yaml-kafka:9092
window:
  max_samples: 64
  schedule: "0 4 * * 2"
ewc:
  lambda: 200
lora:
  r: 8
  target_modules: [q_proj]
training:
  epochs: 1
signing_key: from-yaml
"""


def check_yaml_values(s: Settings) -> None:
    assert s.kafka.bootstrap_servers == "yaml-kafka:9092"
    assert (s.window.max_samples, s.window.schedule) == (64, "0 4 * * 2")
    assert s.ewc.lambda_ == 200.0
    assert (s.lora.r, s.lora.alpha, s.lora.target_modules) == (8, 32, ["q_proj"])
    assert s.training.epochs == 1
    assert s.signing_key is not None and s.signing_key.get_secret_value() == "from-yaml"


def test_yaml_file_by_path(tmp_path: Path) -> None:
    check_yaml_values(load_settings(write_yaml(tmp_path / "se.yaml", YAML)))
    check_yaml_values(load_settings(str(tmp_path / "se.yaml")))


def test_yaml_file_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(write_yaml(tmp_path / "se.yaml", YAML)))
    check_yaml_values(load_settings())


def test_environment_wins_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_WINDOW__MAX_SAMPLES", "7")
    monkeypatch.setenv("STREAMENGINE_EWC__LAMBDA", "900")
    s = load_settings(write_yaml(tmp_path / "se.yaml", YAML))
    assert (s.window.max_samples, s.ewc.lambda_) == (7, 900.0)
    # Fields of the same section not set in the environment still come from the file.
    assert s.window.schedule == "0 4 * * 2"
    assert s.kafka.bootstrap_servers == "yaml-kafka:9092"


def test_explicit_overrides_win_over_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_TRAINING__EPOCHS", "9")
    s = load_settings(write_yaml(tmp_path / "se.yaml", YAML), training={"epochs": 2})
    assert s.training.epochs == 2


def test_load_settings_leaves_the_environment_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_API_TOKEN", "older-spelling")
    before = dict(os.environ)
    check_yaml_values(load_settings(write_yaml(tmp_path / "se.yaml", YAML)))
    assert dict(os.environ) == before
    # The file was read for that call only: later settings do not see it.
    assert load_settings().kafka.bootstrap_servers == "127.0.0.1:9092"
    assert Settings().kafka.bootstrap_servers == "127.0.0.1:9092"


def test_older_token_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path / "se.yaml", "api:\n  token: from-yaml\n  port: 8181\n")
    monkeypatch.setenv("STREAMENGINE_API_TOKEN", "older")
    s = load_settings(path)
    assert s.api.token is not None and s.api.token.get_secret_value() == "older"  # the environment wins
    assert s.api.port == 8181  # the rest of the section still comes from the file
    assert "env_api_token" not in s.model_dump() and "older" not in repr(s)
    monkeypatch.setenv("STREAMENGINE_API__TOKEN", "current")
    s = load_settings(path)
    assert s.api.token is not None and s.api.token.get_secret_value() == "current"


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path)  # a folder is not a config file
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match=CONFIG_ENV):
        load_settings()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("window: [\n", "not valid YAML at line 2"),
        ("signing_key: 'unterminated\n", "not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping of settings, not a list"),
        ("just a string\n", "must hold a mapping of settings, not a str"),
    ],
)
def test_malformed_yaml_is_a_config_error(tmp_path: Path, text: str, says: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert says in str(info.value) and str(path) in str(info.value)
    assert "unterminated" not in str(info.value)  # values are never quoted back


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write_yaml(tmp_path / "empty.yaml", "")).window.max_samples == 1000


@pytest.mark.parametrize(
    ("var", "value", "dotted"),
    [
        ("STREAMENGINE_WINDOW__MAX_SAMPLES", "zero", "window.max_samples"),
        ("STREAMENGINE_WINDOW__MAX_SAMPLES", "0", "window.max_samples"),
        ("STREAMENGINE_WINDOW__MAX_WEIGHT", "-1", "window.max_weight"),
        ("STREAMENGINE_EWC__LAMBDA", "-5", "ewc.lambda"),
        ("STREAMENGINE_TRAINING__EPOCHS", "1.5", "training.epochs"),
        ("STREAMENGINE_METRICS__PORT", "70000", "metrics.port"),
        ("STREAMENGINE_STORAGE__SECURE", "maybe", "storage.secure"),
        ("STREAMENGINE_STORAGE__ENDPOINT", "http://minio:9000", "storage.endpoint"),
        ("STREAMENGINE_LORA__DROPOUT", "1", "lora.dropout"),
    ],
)
def test_invalid_env_value_names_setting_and_env_var(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, dotted: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"{dotted} ({var})" in message
    assert "\n" not in message


def test_invalid_yaml_value_names_setting_and_env_var(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "se.yaml", "window:\n  max_samples: lots\nlora:\n  r: 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "window.max_samples (STREAMENGINE_WINDOW__MAX_SAMPLES)" in message
    assert "lora.r (STREAMENGINE_LORA__R)" in message


def test_unknown_yaml_key_in_a_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"window\.max_sample \(STREAMENGINE_WINDOW__MAX_SAMPLE\)"):
        load_settings(write_yaml(tmp_path / "se.yaml", "window:\n  max_sample: 5\n"))


def test_error_message_does_not_echo_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_WINDOW__MAX_SAMPLES", "hunter2-secret")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "hunter2" not in str(info.value)


def test_env_name() -> None:
    assert env_name(("window", "max_samples")) == "STREAMENGINE_WINDOW__MAX_SAMPLES"
    assert env_name(("lora", "target_modules", 0)) == "STREAMENGINE_LORA__TARGET_MODULES"
    assert env_name(("signing_key",)) == "STREAMENGINE_SIGNING_KEY"


def test_secrets_stay_out_of_repr_and_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMENGINE_DATABASE__URL", "postgresql://se:db-pa55word@db:5432/se")
    monkeypatch.setenv("STREAMENGINE_STORAGE__SECRET_KEY", "s3-secret-key")
    monkeypatch.setenv("STREAMENGINE_STORAGE__ACCESS_KEY", "s3-access-key")
    monkeypatch.setenv("STREAMENGINE_SIGNING_KEY", "hmac-signing-key")
    monkeypatch.setenv("STREAMENGINE_API__TOKEN", "api-bearer-token")
    s = load_settings()
    secrets = ["db-pa55word", "s3-secret-key", "s3-access-key", "hmac-signing-key", "api-bearer-token"]
    for text in (repr(s), str(s), repr(s.database), str(s.storage), f"{s}"):
        for secret in secrets:
            assert secret not in text
    assert s.api.token is not None and s.api.token.get_secret_value() == "api-bearer-token"
