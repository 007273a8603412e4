"""Settings: the only module that reads the environment.

Sources, strongest first: explicit overrides, environment variables (prefix ``STREAMENGINE_``, ``__``
between nested names), an optional YAML file (``--config`` or ``STREAMENGINE_CONFIG``), defaults.
Every setting with its default and description: ``streamengine settings`` (docs/operations.md, generated).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from streamengine.core.replay import ReplayScaling, ReplaySelection
from streamengine.errors import ConfigError

ENV_PREFIX = "STREAMENGINE_"
CONFIG_ENV = "STREAMENGINE_CONFIG"
_YAML_FILE: ContextVar[Path | None] = ContextVar("streamengine_yaml_file", default=None)
"""The YAML file :func:`load_settings` is reading (unset: ``STREAMENGINE_CONFIG``, if set)."""

PLACEHOLDER_SECRETS = frozenset(
    {
        "change-me", "changeme", "change_me", "change me", "changeit", "change-it", "replace-me", "replaceme",
        "secret", "password", "passwd", "token", "admin", "default", "example", "xxx", "todo", "fixme",
    }
)  # fmt: skip
"""Values that examples and templates ship in place of a secret (compared ignoring case and surrounding
blanks): refused for every secret setting, so a copied example never guards a real deployment."""
_API_TOKEN_ENVS = (ENV_PREFIX + "API__TOKEN", ENV_PREFIX + "API_TOKEN")
"""The environment names of api.token, the current spelling first."""
MINIO_DEFAULT_KEY = "minioadmin"
"""MinIO's well-known default keys (storage.access_key/secret_key): allowed only with a loopback endpoint."""


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address, IPv6 in brackets or not) reaches this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _blank_is_unset(value: Any) -> Any:
    """An empty or blank secret (``STREAMENGINE_API__TOKEN=``) counts as unset: the field keeps its default."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if isinstance(raw, str) and not raw.strip():
        raise PydanticUseDefault()
    return value


def _not_placeholder(value: SecretStr | None) -> SecretStr | None:
    if value is not None and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
        raise ValueError("is a placeholder from an example, not a secret: set a real one (e.g. `openssl rand -hex 32`)")
    return value


Secret = Annotated[SecretStr, BeforeValidator(_blank_is_unset), AfterValidator(_not_placeholder)]
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_blank_is_unset), AfterValidator(_not_placeholder)]
"""Every secret setting: blank counts as unset (its default), a placeholder (:data:`PLACEHOLDER_SECRETS`) is refused."""


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"no file {value}")
    return value


OptionalFile = Annotated[Path | None, BeforeValidator(_blank_is_unset), AfterValidator(_existing_file)]
"""A certificate or key file: blank counts as unset, a named file must exist (checked at start, not at first use)."""
OptionalName = Annotated[str | None, BeforeValidator(_blank_is_unset)]


def _hosts(servers: str) -> list[str]:
    """The host names of ``host:port[,host:port...]``."""
    return [urlsplit("//" + server.strip()).hostname or "" for server in servers.split(",") if server.strip()]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    feedback_topic: str = "feedback.events"
    dlq_topic: str = "feedback.events.dlq"
    released_topic: str = "adapter.released"
    canary_topic: str = Field(
        "adapter.canary", description="Canary announcements, read only by nodes that take part in canaries."
    )
    status_topic: str = Field("adapter.status", description="What each serving node runs (compacted).")
    group_id: str = "streamengine-ingest"
    consumer: Literal["aiokafka", "faust"] = Field(
        "aiokafka", description="Ingest consumer: plain aiokafka (fastest) or a faust-streaming agent."
    )
    partitions: int = Field(6, ge=1, description="Partitions for topics streamengine creates.")
    replication_factor: int = Field(1, ge=1)
    batch_max_records: int = Field(1000, ge=1, description="Most records ingested in one batch.")
    batch_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=65_536,
        description="Most bytes (keys, values and headers) of the records of one ingest batch, and of what the "
        "consumer fetches ahead: memory stays bounded whatever the records' size (a batch holds at least one record).",
    )
    batch_max_wait_s: float = Field(0.5, gt=0, description="Longest wait to fill a batch.")
    max_record_bytes: int = Field(1_048_576, ge=256, description="Larger records go to the DLQ.")
    session_timeout_s: float = Field(30.0, gt=0)
    rebalance_timeout_s: float = Field(60.0, gt=0)
    commit_interval_s: float = Field(1.0, gt=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How every Kafka client (ingest, DLQ and outbox producers, topic admin, subscribers, faust) "
        "connects: PLAINTEXT, SSL (TLS; mutual TLS with ssl_certfile), SASL_SSL (user and password over TLS: "
        "managed Kafka) or SASL_PLAINTEXT.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism of SASL_SSL / SASL_PLAINTEXT."
    )
    sasl_username: OptionalName = Field(None, description="SASL user (required with SASL_*).")
    sasl_password: OptionalSecret = Field(None, description="SASL password (required with SASL_*).")
    ssl_cafile: OptionalFile = Field(
        None, description="PEM file of the CA of the brokers' certificates (SSL, SASL_SSL); unset: the system's CAs."
    )
    ssl_certfile: OptionalFile = Field(
        None, description="Client certificate (PEM) for mutual TLS; may hold its key too (else ssl_keyfile)."
    )
    ssl_keyfile: OptionalFile = Field(None, description="Private key (PEM, unencrypted) of ssl_certfile.")

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        """Settings that would be silently ignored, or send a password in the clear, are refused."""
        protocol = self.security_protocol
        sasl, tls = protocol.startswith("SASL_"), protocol in ("SSL", "SASL_SSL")
        env = ENV_PREFIX + "KAFKA__"
        if sasl and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(
                f"kafka.security_protocol {protocol} needs kafka.sasl_username and kafka.sasl_password "
                f"({env}SASL_USERNAME, {env}SASL_PASSWORD)"
            )
        if not sasl and (self.sasl_username is not None or self.sasl_password is not None):
            raise ValueError(
                f"kafka.sasl_username/sasl_password are set but kafka.security_protocol is {protocol}: "
                f"set it ({env}SECURITY_PROTOCOL) to SASL_SSL"
            )
        if not tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError(
                f"kafka.ssl_cafile/ssl_certfile/ssl_keyfile are set but kafka.security_protocol is {protocol}: "
                f"set it ({env}SECURITY_PROTOCOL) to SSL or SASL_SSL"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError(f"kafka.ssl_keyfile is set without kafka.ssl_certfile ({env}SSL_CERTFILE)")
        clear = protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN"
        if clear and not all(is_loopback(host) for host in _hosts(self.bootstrap_servers)):
            raise ValueError(
                "kafka.sasl_mechanism PLAIN over SASL_PLAINTEXT would send the password in the clear to a broker "
                "on another machine: use security_protocol SASL_SSL (or a SCRAM mechanism)"
            )
        return self


class DatabaseSettings(_Section):
    url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/streamengine")
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(8, ge=1)
    api_pool_size: int = Field(
        2,
        ge=1,
        description="Connections of the admin API's read endpoints (/health, /metrics, /training/status, /adapters) "
        "in a pool of their own, besides pool_max: a flood of reads waits there instead of taking ingest's.",
    )
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        None,
        description="TLS to PostgreSQL, as libpq's sslmode (wins over an `sslmode=` in the url). Unset: the url's, "
        "else `prefer` (TLS when the server offers it, certificate not checked). `verify-full` checks the "
        "certificate against database.ca_file and the host name.",
    )
    ca_file: OptionalFile = Field(
        None,
        description="PEM file of the CA of the server's certificate (wins over `sslrootcert=` in the url); needs "
        "sslmode require, verify-ca or verify-full. Unset: ~/.postgresql/root.crt.",
    )

    @model_validator(mode="after")
    def _ca_needs_verification(self) -> DatabaseSettings:
        mode = self.sslmode or parse_qs(urlsplit(self.url.get_secret_value()).query).get("sslmode", [None])[-1]
        if self.ca_file is not None and mode not in ("require", "verify-ca", "verify-full"):
            raise ValueError(
                f"database.ca_file is set but the sslmode is {mode or 'unset (prefer)'}, which checks no "
                f"certificate: set database.sslmode ({ENV_PREFIX}DATABASE__SSLMODE) to verify-full"
            )
        return self

    @field_validator("url")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        # Never quotes the value. An unencoded @ / ? # in the password would cut the DSN elsewhere and put
        # pieces of the password into host names, error messages and logs.
        dsn = value.get_secret_value()
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("give a postgresql:// DSN (value not shown: it may hold a password)")
        if parts.fragment or dsn.count("@") > 1 or ("@" in dsn and "@" not in parts.netloc):
            raise ValueError("percent-encode the special characters (@ : / ? # %) of the user name and password")
        return value


class StorageSettings(_Section):
    endpoint: str = Field("127.0.0.1:9000", description="S3 host:port")
    access_key: Secret = SecretStr(MINIO_DEFAULT_KEY)
    secret_key: Secret = SecretStr(MINIO_DEFAULT_KEY)
    bucket: str = "lora-adapters"
    secure: bool = False
    region: str = "us-east-1"
    ca_file: OptionalFile = Field(
        None,
        description="PEM file of the CA of the S3 server's certificate (needs storage.secure). Unset: the file "
        "SSL_CERT_FILE names, else certifi's public CAs.",
    )

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if "://" in value or "/" in value:
            raise ValueError("give host:port without a scheme (use storage.secure for TLS)")
        return value

    @model_validator(mode="after")
    def _default_keys_on_loopback_only(self) -> StorageSettings:
        keys = (self.access_key.get_secret_value(), self.secret_key.get_secret_value())
        if MINIO_DEFAULT_KEY in keys and not is_loopback(urlsplit("//" + self.endpoint).hostname or ""):
            raise ValueError(
                f"storage.access_key/secret_key (STREAMENGINE_STORAGE__ACCESS_KEY/__SECRET_KEY) are MinIO's default "
                f"'{MINIO_DEFAULT_KEY}', allowed only with a loopback storage.endpoint: set the keys of the S3 server"
            )
        if self.ca_file is not None and not self.secure:
            raise ValueError(
                f"storage.ca_file is set but storage.secure is false: set {ENV_PREFIX}STORAGE__SECURE=true for TLS"
            )
        return self


class ModelSettings(_Section):
    name: str = Field("tiny-llama", description="The model line, as in events' `model` field.")
    base: str = Field("", description="Local Hugging Face model folder, hub id or .gguf file.")
    quantization: Literal["none", "8bit", "4bit"] = "none"


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Attention and MLP: the MLP holds new facts away from the attention that carries the base skill's copying
    # (docs/learning.md, "LoRA on the MLP"). A line keeps the targets of its first version.
    target_modules: list[str] = ["q_proj", "v_proj", "up_proj", "down_proj"]


class EwcSettings(_Section):
    lambda_: float = Field(500.0, alias="lambda", ge=0, description="EWC strength.")
    # 1.0 (every window at full weight): 0.5 learned a newest window that 1.0 missed and lost earlier conflicting
    # windows on more runs (docs/learning.md, "Online-EWC decay").
    gamma: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Online-EWC decay: each version's Fisher is gamma times its parent's plus its own window's "
        "(1.0: every window at full weight, the pull growing with each version).",
    )
    normalize: Literal["none", "mean", "sum"] = Field(
        "sum",
        description="Scale of each window's Fisher before it is accumulated: `sum` to sum 1 over the LoRA "
        "parameters (lambda then weighs an importance-weighted mean squared drift; see docs/learning.md), "
        "`mean` to mean 1, `none` keeps the raw Fisher.",
    )
    fisher_sources: list[Literal["window", "replay", "anchor"]] = Field(
        ["window", "anchor"],
        min_length=1,
        description="Which of the job's sample lines the Fisher is computed on: `window` (the new feedback), "
        "`replay` (earlier windows), `anchor` (the self or user anchor set: the penalty then also holds the "
        "parameters the base skill needs; docs/learning.md).",
    )
    fisher_balance: Literal["pooled", "sources"] = Field(
        "pooled",
        description="How the Fisher's sources share its importance: `pooled` (one mean over their lines: a "
        "source weighs what its gradients weigh, and the anchors' are small where the base skill is kept) or "
        "`sources` (each source an equal share of the total; docs/learning.md).",
    )


class TrainingSettings(_Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="Clip each step's gradient to this L2 norm (null: no clipping). A long job at a high learning "
        "rate can diverge without it; it also caps the EWC penalty's pull (docs/learning.md).",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine",
        description="The learning rate over a job's steps (transformers' schedulers): constant, or decaying to 0 "
        "linearly or along a cosine after the warm-up (cosine kept more and collapsed less than constant on the "
        "forgetting benchmark: docs/learning.md).",
    )
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of a job's steps over which the learning rate rises from 0 (linear)."
    )
    max_length: int = Field(2048, ge=8)
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    objective: Literal["sft", "kto"] = Field(
        "sft", description="sft: learn desirable completions; kto: also push undesirable ones down (TRL's KTO)."
    )
    kto_beta: float = Field(0.1, gt=0, description="KTO beta (TRL's default 0.1).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable samples (TRL's lambda_D).")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable samples (lambda_U).")
    processes: int = Field(1, ge=1, description="Training processes (DDP through torchrun; one per GPU).")
    fisher_chunk_size: int = Field(8, ge=1, description="Samples per vmap call of the exact Fisher (bounds memory).")


class SampleSettings(_Section):
    kind_weights: dict[str, float] = {"thumbs_up": 1.0, "rating": 1.0, "correction": 2.0, "thumbs_down": 1.0}
    positive_rating_min: int = Field(4, ge=1, le=5)
    negative_rating_max: int = Field(2, ge=1, le=5)
    max_prompt_chars: int = Field(
        65_536, ge=1, description="Most characters of a prompt (a string, or its messages' contents together)."
    )
    max_completion_chars: int = Field(
        65_536, ge=1, description="Most characters of a response (of a correction, for kind `correction`)."
    )
    max_messages: int = Field(
        256, ge=1, description="Most chat messages of a prompt; an event with more goes to the DLQ (`too_long`)."
    )
    overlength: Literal["reject", "truncate"] = Field(
        "reject",
        description="A longer prompt or completion: `reject` sends the event to the DLQ (reason `too_long`); "
        "`truncate` keeps the end of the prompt and the start of the completion, counted in "
        "`streamengine_samples_truncated_total`.",
    )

    @field_validator("kind_weights")
    @classmethod
    def _weights_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        # Bounded like an event's weight, so that summed window weights stay finite in PostgreSQL.
        bad = [kind for kind, weight in value.items() if not 0 <= weight <= 1_000_000]
        if bad:
            raise ValueError(f"weights must be between 0 and 1e6 (not {', '.join(sorted(bad))})")
        return value


class SelfAnchorSettings(_Section):
    """Anchor samples without a curated anchor set: prompts answered by the base model (docs/learning.md)."""

    enabled: bool = Field(
        True,
        description="When learning.anchor_path is unset, build an anchor set from prompts the base model answers: "
        "once per base model, stored in S3 beside the adapters and reused by every job on that base.",
    )
    prompts_path: Path | None = Field(
        None, description='A prompt-only file (JSONL of {"prompt": ...}, or one prompt a line): answered first.'
    )
    stream_prompts: int = Field(
        0, ge=0, description="Most prompts drawn from the stream (every kind of feedback, every model line) to answer."
    )
    magpie: bool = Field(
        True,
        description="Top the set up with prompts the base writes from its chat template's user-turn prefix "
        "(Magpie; needs a chat template).",
    )
    samples: int = Field(256, ge=2, description="Size of the set; half of it is the gate's anchor check.")
    max_new_tokens: int = Field(256, ge=1, description="Longest prompt the base writes, and longest answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the prompts the base writes.")
    min_chars: int = Field(1, ge=1, description="Prompts or answers shorter than this are dropped.")
    max_repeat: float = Field(
        0.5, gt=0, le=1, description="Text whose most frequent 4-gram covers more than this share of it is dropped."
    )
    seed: int = Field(0, description="Seed of the prompts the base writes.")


class DistillSettings(_Section):
    """Distillation toward the base model on the anchor samples (docs/learning.md)."""

    weight: float = Field(0.0, ge=0, description="Weight of KL(base || model) on anchor completions; 0: off.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions (loss times T^2).")


class LearningSettings(_Section):
    """Replay, holdouts, the anchor set, the per-user cap and the release gate (see docs/learning.md)."""

    replay_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of each job's samples replayed from earlier windows (per earlier window when "
        "replay_scaling is windows).",
    )
    replay_scaling: ReplayScaling = Field(
        "windows",
        description="fixed: replay_fraction of every job; windows: replay_fraction per earlier window, at most "
        "max_replay_fraction (see docs/learning.md).",
    )
    max_replay_fraction: float = Field(
        0.45, ge=0, lt=1, description="Largest replay share of a job when replay_scaling is windows."
    )
    replay_selection: ReplaySelection = Field(
        "uniform",
        description="Which earlier samples are replayed: uniform (a pseudo-random pick), balanced (the earlier "
        "windows in turn, every prompt once before any twice), loss (the ones the parent adapter now gets most "
        "wrong, of a pseudo-random pool four times as large).",
    )
    parent_average: float = Field(
        0.0, ge=0, lt=1, description="Average the trained adapter with its parent: this share of the parent (0: off)."
    )
    orthogonal_weight: float = Field(
        0.0, ge=0, description="O-LoRA-style penalty keeping the LoRA A update orthogonal to the parent's (0: off)."
    )
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of samples held out for evaluation.")
    min_holdout_samples: int = Field(
        20, ge=0, description="Fewest holdout samples per window: topped up from its training samples (at most half)."
    )
    retention_max_samples: int = Field(256, ge=0, description="Most earlier-window holdout samples evaluated.")
    anchor_path: Path | None = Field(None, description="JSONL of base-capability samples (prompt, completion).")
    anchor_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of each job's samples drawn from the anchor set."
    )
    anchor_min_samples: int = Field(
        16, ge=0, description="Fewest anchor samples in a job (a small window's share would be a handful)."
    )
    anchor_weight: float = Field(
        2.0,
        gt=0,
        description="Factor on each anchor sample's weight in the job's loss and Fisher: the anchors pull harder "
        "without more samples or time (see docs/learning.md).",
    )
    anchor_rotation: bool = Field(
        True,
        description="Put the whole anchor pool in each job and train each epoch on a fresh draw of as many "
        "anchors as the share picks: every anchor is seen at the step count of a few (see docs/learning.md). "
        "false: the job trains on the picked anchors only.",
    )
    max_user_share: float = Field(0.2, gt=0, le=1, description="Most of a window's weight one user may hold.")
    gate: bool = Field(True, description="Refuse candidates that do not improve or forget too much.")
    max_forgetting: float = Field(0.1, ge=0, description="Largest relative rise of retention loss released.")
    min_improvement: float = Field(0.0, description="Smallest relative fall of holdout loss released.")
    max_base_forgetting: float = Field(
        0.5, ge=0, description="Largest rise of the anchor set's loss from the base model's released (see docs)."
    )
    self_anchor: SelfAnchorSettings = SelfAnchorSettings()
    distill: DistillSettings = DistillSettings()

    @model_validator(mode="after")
    def _fractions(self) -> LearningSettings:
        if self.replay_fraction + self.anchor_fraction >= 1:
            raise ValueError("replay_fraction + anchor_fraction must stay below 1")
        if self.replay_scaling == "windows" and self.max_replay_fraction + self.anchor_fraction >= 1:
            raise ValueError("max_replay_fraction + anchor_fraction must stay below 1")
        return self


class WindowSettings(_Section):
    max_samples: int = Field(1000, ge=1, description="Trainable samples that close a window.")
    max_weight: float | None = Field(None, gt=0, description="Summed weight that closes a window.")
    min_samples: int = Field(1, ge=1, description="Fewest samples the weekly tick trains on.")
    schedule: str = Field("0 2 * * 1", description="Cron expression of the weekly tick.")
    timezone: str = "UTC"


class WorkerSettings(_Section):
    lease_s: float = Field(60.0, gt=0, description="A job whose lease expires is claimed again.")
    heartbeat_s: float = Field(10.0, gt=0)
    poll_s: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    work_dir: Path = Path(".streamengine/work")
    trainer_memory_limit_mb: int | None = Field(
        None,
        ge=64,
        description="Most CPU memory (MiB) a training process may allocate (RLIMIT_DATA; GPU memory does not "
        "count, CUDA itself takes about 1 GiB of it); above it the job fails with 'out of memory' instead of the "
        "host swapping or the OOM killer picking a process. Unset: no limit.",
    )
    warm: bool = Field(
        True,
        description="Keep a trainer process between training jobs, with torch imported and the base model loaded "
        "(docs/operations.md, Warm trainer). false: a fresh process per job. Training in several processes "
        "(training.processes > 1), on a quantized base, and Fisher jobs always start a fresh one.",
    )
    warm_bases: int = Field(
        1, ge=1, description="Base models the warm trainer keeps loaded; another replaces the one used longest ago."
    )
    max_jobs_per_process: int = Field(
        100, ge=1, description="Jobs a warm trainer runs before a fresh process replaces it (leaks end with it)."
    )
    warm_max_rss_mb: int | None = Field(
        None,
        ge=64,
        description="Resident memory (MiB) above which the warm trainer is replaced after a job. Unset: twice what "
        "it held after its first job.",
    )


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: OptionalSecret = None
    url: str = Field("", description="Where CLI commands reach the admin API (default host:port).")

    def base_url(self) -> str:
        return self.url or f"http://{self.host}:{self.port}"


class MetricsSettings(_Section):
    port: int = Field(9090, ge=0, le=65535, description="Prometheus port of `worker`/`subscribe`.")


class ServingSettings(_Section):
    download_dir: Path = Path(".streamengine/adapters")
    group_id: str = Field("", description="Consumer group of a subscriber (default: none, reads all).")
    swapper: Literal["peft", "vllm", "sglang", "max", "print"] = Field(
        "peft",
        description="How `subscribe` serves each verified adapter: in-process PEFT, an inference server's "
        "runtime LoRA API (vLLM, SGLang, MAX Serve), or print only.",
    )
    server_url: str = Field("http://127.0.0.1:8000", description="Base URL of the vLLM/SGLang/MAX server.")
    api_key: OptionalSecret = Field(None, description="Bearer token of that server (vLLM --api-key).")
    server_adapter_dir: str = Field(
        "", description="download_dir as the inference server sees it (another mount point); default: the same."
    )
    request_timeout_s: float = Field(120.0, gt=0, description="Longest wait for one load/unload call.")
    hotswap: bool = Field(True, description="PEFT: swap weights in place when rank and targets match.")
    public_key_file: Path | None = Field(
        None,
        description="PEM file of the Ed25519 public key releases are signed with (`signing.private_key_file` on "
        "the engine); releases must then carry a valid `signature_ed25519`. It cannot sign.",
    )
    require_signature: bool = Field(
        False,
        description="Refuse to start without a key to check releases with (this file or `signing_key`). Unset: a "
        "node without one accepts unsigned releases and says so at start.",
    )
    max_adapter_bytes: int = Field(
        4 << 30, ge=1, description="Most bytes the files of one release may have; a larger one is refused."
    )
    download_timeout_s: float = Field(
        300.0, gt=0, description="Longest download of one file; a slower one is abandoned and tried again later."
    )
    node_id: str = Field(
        "",
        max_length=128,
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._:@-]*)?$",
        description="This node's id in the fleet (canary membership, adapter.status). Empty: the host name.",
    )
    canary: bool = Field(
        True, description="Take part in canaries: run a canary version when the engine names this node for one."
    )
    status_interval_s: float = Field(
        30.0, gt=0, description="Heartbeat of this node's adapter.status record (also sent on every change)."
    )

    @property
    def node(self) -> str:
        """This node's id: ``node_id``, else the host name."""
        return self.node_id or socket.gethostname()


def _seconds_text(value: Any) -> Any:
    """A duration given as a number of seconds in text (an environment variable: ``86400``) is read as one."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d*)?\s*", value):
        return float(value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_seconds_text)]
"""Seconds (``86400``), ``[D days,] HH:MM:SS`` or ISO 8601 (``PT24H``, ``P1D``)."""


class RolloutSettings(_Section):
    """Canary releases judged by live feedback (see docs/serving.md, Canary judgement)."""

    canary_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of a model line's serving nodes that run a new version first, chosen by a stable hash of "
        "node id and line (at least one node, and below 1 never every node of two or more). 0: no canary, every "
        "node at once.",
    )
    max_regression: float = Field(
        0.02, ge=0, lt=1, description="Largest rise in the share of negative feedback (absolute) that is promoted."
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Posterior probability a promotion or an evidence rollback needs."
    )
    min_events: int = Field(
        200, ge=1, description="Feedback events (after the per-user cap) each side needs before the evidence decides."
    )
    max_user_share: float = Field(
        0.005,
        gt=0,
        le=1,
        description="Most of a side's feedback events one user (else session) holds in the judgement; with fewer "
        "than 1/max_user_share users on a side, each counts as much as the lightest. 1 turns the cap off.",
    )
    max_failed_nodes: int = Field(0, ge=0, description="Nodes that may fail to load a canary; one more rolls it back.")
    max_duration: Duration = Field(
        timedelta(hours=24),
        gt=timedelta(0),
        description="Longest canary: then timeout_action. Seconds, HH:MM:SS or ISO 8601 (PT24H).",
    )
    timeout_action: Literal["rollback", "promote"] = Field(
        "rollback", description="What a canary still undecided after max_duration gets: rolled back or promoted."
    )
    node_timeout_s: float = Field(
        120.0, gt=0, description="A serving node whose status is older than this counts as silent."
    )


class SigningSettings(_Section):
    private_key_file: Path | None = Field(
        None,
        description="PEM file of the Ed25519 private key the engine (worker, API) signs releases with; nodes "
        "verify with the public key (`serving.public_key_file`). Can be used with or instead of `signing_key`.",
    )


class PrivacySettings(_Section):
    """Redaction before storage, retention and forgetting (see docs/operations.md, Privacy)."""

    redact: list[Literal["email", "phone", "card"]] = Field(
        ["email", "phone", "card"],
        description="Built-in redactions of prompts, responses and corrections before they are stored: matches "
        "become `[email]`, `[phone]`, `[card]` (Luhn-checked). `[]` turns them off.",
    )
    patterns: dict[str, str] = Field(
        {}, description="Extra redactions: name -> regular expression (Python syntax); matches become `[name]`."
    )
    function: str | None = Field(
        None,
        description="`package.module:function` (str -> str) applied to every text after the other redactions; "
        "imported once at start. An event it fails on goes to the DLQ (`redaction_failed`).",
    )
    retention_days: int | None = Field(
        None, ge=1, description="Delete stored samples this many days after they were stored (unset: keep forever)."
    )
    retention_batch_size: int = Field(1000, ge=1, description="Most samples the retention loop deletes at once.")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, value: dict[str, str]) -> dict[str, str]:
        for name, regex in value.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or name in ("email", "phone", "card", "function"):
                raise ValueError(
                    f"pattern name {name[:40]!r} must be lower-case letters, digits and _ (at most 32), starting with "
                    "a letter, and not a built-in kind"
                )
            try:
                compiled = re.compile(regex)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc}") from None
            if compiled.match(""):
                raise ValueError(f"pattern {name!r} matches the empty string")
        return value

    @field_validator("function")
    @classmethod
    def _module_colon_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
            raise ValueError("give it as package.module:function")
        return value


LINE_SECTIONS = ("window", "lora", "training", "ewc", "learning", "rollout")
"""The sections a ``models:`` entry may override (config/lines.py)."""


class LineSettings(_Section):
    """One entry of ``models:``: a model line by name, or every line whose name matches a pattern."""

    name: str | None = Field(None, min_length=1, max_length=256, description="The line, as in events' `model` field.")
    pattern: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="A shell-style pattern (`tenant-*`, `?`, `[ab]`; case-sensitive): every line it matches, each "
        "with its own windows, versions and aliases.",
    )
    base: str | None = Field(None, description="Base model of the line(s); unset: model.base.")
    quantization: Literal["none", "8bit", "4bit"] | None = Field(None, description="Unset: model.quantization.")
    window: dict[str, Any] = Field({}, description="Overrides of window.* (only the fields given).")
    lora: dict[str, Any] = Field({}, description="Overrides of lora.*.")
    training: dict[str, Any] = Field({}, description="Overrides of training.*.")
    ewc: dict[str, Any] = Field({}, description="Overrides of ewc.*.")
    learning: dict[str, Any] = Field({}, description="Overrides of learning.* (nested sections key by key).")
    rollout: dict[str, Any] = Field({}, description="Overrides of rollout.*.")

    @model_validator(mode="after")
    def _name_or_pattern(self) -> LineSettings:
        if (self.name is None) == (self.pattern is None):
            raise ValueError("give a line either a name or a pattern (not both)")
        if self.name is not None and any(c in self.name for c in "*?["):
            raise ValueError(f"name {self.name[:100]!r} holds a wildcard: give it as `pattern`")
        return self


class Settings(BaseSettings):
    """All settings of one streamengine process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    kafka: KafkaSettings = KafkaSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    model: ModelSettings = ModelSettings()
    models: list[LineSettings] = Field(
        [],
        description="Model lines served by this engine, each a name or a pattern with its base and overrides "
        "(docs/operations.md, Model lines); environment: a JSON list. Empty: the only line is model.name.",
    )
    lora: LoraSettings = LoraSettings()
    ewc: EwcSettings = EwcSettings()
    training: TrainingSettings = TrainingSettings()
    samples: SampleSettings = SampleSettings()
    window: WindowSettings = WindowSettings()
    learning: LearningSettings = LearningSettings()
    worker: WorkerSettings = WorkerSettings()
    api: ApiSettings = ApiSettings()
    metrics: MetricsSettings = MetricsSettings()
    serving: ServingSettings = ServingSettings()
    rollout: RolloutSettings = RolloutSettings()
    privacy: PrivacySettings = PrivacySettings()
    signing_key: OptionalSecret = None
    signing: SigningSettings = SigningSettings()
    env_api_token: OptionalSecret = Field(
        None,
        validation_alias=AliasChoices(*_API_TOKEN_ENVS),
        exclude=True,
        repr=False,
        description="api.token as the environment gives it: the older spelling STREAMENGINE_API_TOKEN is "
        "accepted too (the current one wins); either wins over the YAML file.",
    )

    @model_validator(mode="after")
    def _token_from_environment(self) -> Settings:
        """The older spelling cannot nest into ``api`` by itself: read as a field, then moved there."""
        if self.env_api_token is not None:
            self.api.token = self.env_api_token
        return self

    @model_validator(mode="after")
    def _lines(self) -> Settings:
        """Line names are unique and every entry's overrides give valid settings (the error names the entry)."""
        from streamengine.config import lines  # it builds on this module

        names = [entry.name for entry in self.models if entry.name is not None]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"models: line {twice[0][:100]!r} is listed more than once")
        patterns = [entry.pattern for entry in self.models if entry.pattern is not None]
        if twice := sorted({p for p in patterns if patterns.count(p) > 1}):
            raise ValueError(f"models: pattern {twice[0][:100]!r} is listed more than once")
        try:
            lines.check(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_path = _YAML_FILE.get() or os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)


def env_name(location: tuple[Any, ...]) -> str:
    """The environment variable that sets the field at ``location`` (as pydantic reports it)."""
    parts = [str(p) for p in location if not isinstance(p, int)]
    return ENV_PREFIX + "__".join(p.upper() for p in parts)


def _check_yaml(path: Path) -> None:
    """A YAML file that does not parse, or holds no mapping, is a :class:`ConfigError` (no values quoted)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {exc.problem}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {type(exc).__name__}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not a {type(data).__name__}")


def _config_path(config_file: str | Path | None) -> Path | None:
    """The YAML file to read (``config_file``, else ``STREAMENGINE_CONFIG``), checked to exist and parse."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
    elif yaml_path := os.environ.get(CONFIG_ENV):
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {yaml_path} ({CONFIG_ENV}) does not exist")
    else:
        return None
    _check_yaml(path)
    return path


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, turning validation failures into one :class:`ConfigError` per problem list."""
    reading = _YAML_FILE.set(_config_path(config_file))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            # api.token given by the environment is checked twice, once under the name of the variable
            loc = ("api", "token") if err["loc"] and err["loc"][0] in _API_TOKEN_ENVS else err["loc"]
            dotted = ".".join(str(p) for p in loc)
            # a check across sections (models:) has no location: its message names the setting
            problems.append(
                f"{dotted} ({env_name(loc)}): {err['msg']}" if loc else err["msg"].removeprefix("Value error, ")
            )
        raise ConfigError("invalid setting: " + "; ".join(dict.fromkeys(problems))) from None
    except SettingsError as exc:  # a JSON value in the environment that does not parse (never quoted)
        found = re.search(r'field "([^"]+)"', str(exc))
        env = env_name((found.group(1) if found else "?",))
        raise ConfigError(
            f"invalid setting: {env} or an {env}__* variable holds a value that is not valid JSON"
        ) from None
    finally:
        _YAML_FILE.reset(reading)
