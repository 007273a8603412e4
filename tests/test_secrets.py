"""No secret leaves the configuration: everything the real processes print, serve, store and send is grepped.

Distinctive random secrets are configured: the keys of an S3 server of this test (SeaweedFS checking exactly
them), the password of a PostgreSQL role of this test (owner of the test's database), the signing key, the
admin API token and the inference server's API key. The engine, a worker and a subscriber run as processes at
DEBUG log level through a whole release; errors are provoked on purpose (wrong S3 keys, an unreachable or
missing database, a malformed DSN, bad tokens, invalid settings beside secrets, S3 and PostgreSQL failing
under the running engine). Every captured source (process logs, CLI output, HTTP bodies and headers, the
released event, every stored S3 object, every database row, every file the processes wrote) is searched for
each secret and its obvious encodings, whole or cut to their first or last 12 characters, also with the
line breaks and table borders of the output taken out.

The test server trusts 127.0.0.1 (pg_hba), so it would not refuse a wrong password: the database errors are
provoked with the right password at a closed port, on a missing database, in a malformed DSN and for the
role once it may no longer log in.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import logging
import re
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
import yaml

from streamengine.local.embedded import SeaweedS3, free_port
from tests import process_tools
from tests.kafka_tools import feedback, produce, read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration]

PIECE = 12
"""The first or last this many characters of a secret (or of an encoding of it) give it away."""
_LAYOUT = re.compile(r"[\s\u2500-\u257f]+")  # line breaks, padding and the box drawing of rich tables
WINDOW = 16


def encodings(value: str) -> dict[str, str]:
    """The forms a secret may travel in."""
    raw = value.encode()
    return {
        "raw": value,
        "percent-encoded": quote(value, safe=""),
        "form-encoded": quote_plus(value),
        "JSON string": json.dumps(value)[1:-1],
        "base64": base64.b64encode(raw).decode(),
        "base64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


@dataclass
class Secrets:
    """The secret values of one test, by setting, and the search for them."""

    values: dict[str, str]
    _needles: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, value in self.values.items():
            assert len(value) >= 2 * PIECE, name
            for how, text in encodings(value).items():
                for needle, part in ((text, "whole"), (text[:PIECE], "start"), (text[-PIECE:], "end")):
                    self._needles.setdefault(needle, f"{name} ({how}, {part})")

    def leaks(self, text: str) -> list[str]:
        """Where ``text`` gives a secret away (also when a table wrapped it over lines)."""
        found = []
        for variant in (text, _LAYOUT.sub("", text)):
            for needle, what in self._needles.items():
                at = variant.find(needle)
                if at >= 0:
                    found.append(f"{what}: ...{variant[max(0, at - 80) : at + len(needle) + 40]!r}...")
        return sorted(set(found))


def make_secrets() -> Secrets:
    return Secrets(
        {
            "storage.access_key": secrets.token_hex(12).upper(),
            "storage.secret_key": f"{secrets.token_urlsafe(18)}/{secrets.token_hex(5)}+{secrets.token_hex(5)}",
            "database password": f"{secrets.token_hex(7)}@/%:?#{secrets.token_hex(7)}",
            "signing_key": secrets.token_hex(20),
            "api.token": secrets.token_urlsafe(24),
            "serving.api_key": secrets.token_hex(14),
        }
    )


def test_the_search_finds_every_secret_in_every_form() -> None:
    known = make_secrets()
    for name, value in known.values.items():
        assert known.leaks("nothing here") == []
        for text in encodings(value).values():
            assert known.leaks(f"a line with {text} in it"), (name, text)
        assert known.leaks(f"cut: {value[:PIECE]}..."), name  # a shortened display
        halves = f"│ {value[: len(value) // 2]} │\n│ {value[len(value) // 2 :]} │"  # wrapped in a table cell
        assert any(name in leak for leak in known.leaks(halves)), name


@pytest.mark.parametrize(
    ("dsn", "shown", "where"),
    [
        ("postgresql://se:pa%2Fss@db:6543/se", "postgresql://se:***@db:6543/se", "db:6543/se"),
        ("postgresql://se@db/se?password=pa%40ss&sslmode=require", "postgresql://se@db/se?password=***&sslmode=require",
         "db:5432/se"),
        ("postgres://se:xpass1@[::1]:5433,h2/se?PassWord=ypass2", "postgres://se:***@[::1]:5433,h2/se?PassWord=***",
         "[::1]:5433,h2/se"),
        ("postgresql://se@db:5432/se", "postgresql://se@db:5432/se", "db:5432/se"),
    ],
)  # fmt: skip
def test_a_dsn_is_shown_without_its_passwords(dsn: str, shown: str, where: str) -> None:
    from streamengine.config.reference import mask
    from streamengine.core.masking import dsn_passwords, mask_dsn, redact, target

    assert mask(dsn) == mask_dsn(dsn) == shown
    assert target(dsn) == where
    passwords = dsn_passwords(dsn)
    assert all(p not in redact(f"failed: {dsn}", passwords) for p in passwords)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://se:Zq9/ss@db/se",
        "postgresql://se:Zq9#ss@db/se",
        "postgresql://se:Zq9?ss@db/se",
        "postgresql://se:Zq9@ss@db/se",
        "mysql://se:Zq9ss@db/se",
    ],
)
def test_a_dsn_that_would_spill_its_password_is_refused_without_quoting_it(dsn: str) -> None:
    from streamengine.config.settings import load_settings
    from streamengine.errors import ConfigError

    with pytest.raises(ConfigError, match=r"database\.url \(STREAMENGINE_DATABASE__URL\)") as info:
        load_settings(database={"url": dsn})
    assert "Zq9" not in str(info.value) and "ss@" not in str(info.value)


def test_log_lines_hide_configured_secrets_that_reached_a_message_or_traceback() -> None:
    """The second line of defence behind the code's own care: the formatter of every process's log."""
    from streamengine.logs import Hidden, RedactingFormatter

    known = make_secrets()
    values = known.values
    hidden = Hidden()
    hidden.add(values.values())
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(RedactingFormatter(hidden=hidden))
    log = logging.getLogger("tests.test_secrets.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        dsn = f"postgresql://se:{quote(values['database password'], safe='')}@db/se"
        raise RuntimeError(f"cannot reach {dsn} with {values['storage.secret_key']}")
    except RuntimeError:
        log.exception("request with token %s failed", values["api.token"])
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "request with token *** failed" in text and "cannot reach postgresql://se:***@db/se with ***" in text
    assert known.leaks(text) == []


class Capture:
    """Everything the processes said, served, stored and sent, by source."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}

    def add(self, name: str, content: str | bytes) -> None:
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        assert name not in self.sources, name
        self.sources[name] = text

    def cli(self, name: str, result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.add(f"cli: {name}", f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def http(self, name: str, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.add(f"http: {name}", f"{response.status_code}\n{headers}\n\n{response.text}")
        return response

    def total_bytes(self) -> int:
        return sum(len(text.encode()) for text in self.sources.values())


# --- the services of this test: S3 checking our keys, a role with our password --------------------------
@pytest.fixture
def known() -> Secrets:
    """This test's random secrets."""
    return make_secrets()


@pytest.fixture
def secret_s3(tmp_path: Path, known: Secrets) -> Iterator[SeaweedS3]:
    """An S3 server that accepts only this test's keys (its own log, holding them, is not ours: not grepped)."""
    folder = tmp_path / "s3"
    server = SeaweedS3(
        folder / "data",
        folder / "logs",
        access_key=known.values["storage.access_key"],
        secret_key=known.values["storage.secret_key"],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Role:
    """The test's PostgreSQL role: its password, its database and a DSN with both."""

    name: str
    password: str
    database: str
    dsn: str
    admin_dsn: str

    @property
    def quoted_password(self) -> str:
        return quote(self.password, safe="")

    async def admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def dump(self) -> str:
        """Every row of every table of the test's database, as JSON."""
        conn = await asyncpg.connect(self.admin_dsn.rsplit("/", 1)[0] + "/" + self.database, timeout=10)
        try:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
            )
            parts = []
            for row in tables:
                rows = await conn.fetchval(f"SELECT coalesce(json_agg(t)::text, '[]') FROM \"{row[0]}\" t")
                parts.append(f"{row[0]}: {rows}")
            return "\n".join(parts)
        finally:
            await conn.close()


@pytest_asyncio.fixture
async def secret_role(services: Any, pg_dsn: str, known: Secrets) -> AsyncIterator[Role]:
    """A PostgreSQL role with this test's password, owning the test's database; its DSN."""
    name = f"se_secret_{uuid.uuid4().hex[:10]}"
    database = urlsplit(pg_dsn).path.lstrip("/")
    password = known.values["database password"]
    parts = urlsplit(services.pg_admin_dsn)
    netloc = f"{name}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5432}"
    dsn = urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))
    role = Role(name, password, database, dsn, services.pg_admin_dsn)
    literal = password.replace("'", "''")
    await role.admin(f"CREATE ROLE {name} LOGIN PASSWORD '{literal}'", f'ALTER DATABASE "{database}" OWNER TO {name}')
    try:
        yield role
    finally:
        await role.admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', f"DROP ROLE IF EXISTS {name}")


# --- the whole run ----------------------------------------------------------------------------------------
def closed_port_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{free_port()}"))


async def cli_all(capture: Capture, config: Path, commands: dict[str, list[str]], **env: str) -> dict[str, Any]:
    results = await asyncio.gather(
        *(asyncio.to_thread(process_tools.run_cli, args, config, env, 90) for args in commands.values())
    )
    return {name: capture.cli(name, result) for name, result in zip(commands, results, strict=True)}


async def provoke_errors(capture: Capture, known: Secrets, make: Any, base: dict[str, Any], role: Role,
                         configs: Path) -> dict[str, subprocess.CompletedProcess[str]]:  # fmt: skip
    """Commands that fail on purpose, each with every secret in its settings (``configs/<case>.yaml``)."""
    valid = make(**{**base, "api": {**base["api"], "port": free_port()}, "metrics": {"port": 0}})
    data = yaml.safe_load(process_tools.write_config(valid, configs / "valid.yaml").read_text())

    def config(name: str, **changes: Any) -> Path:
        """The valid settings with ``section__field=value`` changes (written as given: maybe invalid)."""
        changed = copy.deepcopy(data)
        for dotted, value in changes.items():
            section, _, key = dotted.partition("__")
            changed[section][key] = value
        path = configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(changed))
        return path

    wrong = "Wr0ng" + secrets.token_hex(12)
    raw_dsn = role.dsn.replace(role.quoted_password, role.password)
    cases = {
        "run, wrong S3 secret key": (["run"], config("s3-secret", storage__secret_key=wrong)),
        "worker, wrong S3 access key": (["worker", "--once"], config("s3-access", storage__access_key=wrong)),
        "run, PostgreSQL port closed": (["run"], config("pg-closed", database__url=closed_port_dsn(role.dsn))),
        "run, database missing": (["run"], config("pg-missing", database__url=role.dsn + "_missing")),
        "run, DSN of another scheme": (
            ["run"], config("pg-scheme", database__url=role.dsn.replace("postgresql://", "postgresql+asyncpg://"))
        ),
        "run, DSN port not a number": (["run"], config("pg-port", database__url=re.sub(r":\d+/", ":port/", role.dsn))),
        "run, password not percent-encoded": (["run"], config("pg-raw", database__url=raw_dsn)),
        "settings, invalid values beside secrets": (
            ["settings"], config("invalid", storage__endpoint="http://x", window__max_samples=0)
        ),
        "settings, a secret of the wrong type": (
            ["settings", "--json"], config("token-mapping", api__token={"value": known.values["api.token"]})
        ),
        # the second line of defence: the error line masks a secret that got where it does not belong
        "status, the token inside api.url": (
            ["status"], config("token-url", api__url=f"http://{known.values['api.token']}@127.0.0.1:{free_port()}")
        ),
    }  # fmt: skip
    runs = [asyncio.to_thread(process_tools.run_cli, ["--log-level", "DEBUG", *args], path, None, 90)
            for args, path in cases.values()]  # fmt: skip
    half_json = json.dumps({"secret_key": known.values["storage.secret_key"]})[:-1]
    runs.append(asyncio.to_thread(process_tools.run_cli, ["settings"], None, {"STREAMENGINE_STORAGE": half_json}, 60))
    names = [*cases, "settings, malformed JSON of a section holding a secret"]
    results = await asyncio.gather(*runs)
    return {name: capture.cli(name, result) for name, result in zip(names, results, strict=True)}


async def test_no_secret_in_anything_the_processes_show_store_or_send(  # type: ignore[no-untyped-def]
    make_settings, tiny_model, tmp_path, known, secret_s3, secret_role
) -> None:
    values = known.values
    base: dict[str, Any] = {
        "database": {"url": secret_role.dsn},
        "storage": {
            "endpoint": secret_s3.endpoint,
            "access_key": values["storage.access_key"],
            "secret_key": values["storage.secret_key"],
        },
        "api": {"port": free_port(), "token": values["api.token"]},
        "signing_key": values["signing_key"],
        "serving": {"api_key": values["serving.api_key"], "download_dir": str(tmp_path / "adapters")},
        "model": {"base": str(tiny_model)},
        "window": {"max_samples": WINDOW},
        "training": {"epochs": 1, "batch_size": 4, "max_length": 64, "device": "cpu"},
        "learning": {"gate": False},
        "kafka": {"partitions": 1},
    }
    settings = make_settings(**base)
    base_url = settings.api.base_url()
    configs, logs = tmp_path / "config", tmp_path / "logs"
    configs.mkdir()
    logs.mkdir()
    ports = {name: free_port() for name in ("worker", "subscribe", "subscribe-vllm")}

    def config(name: str, **overrides: Any) -> Path:
        merged = {**base, "metrics": {"port": ports.get(name, 0)}, **overrides}
        return process_tools.write_config(make_settings(**merged), configs / f"{name}.yaml")

    commands = {  # name -> (arguments, settings file)
        "run": (["run"], config("run")),
        # the worker takes its password as a DSN parameter (libpq's other spelling)
        "worker": (["worker"], config("worker", database={"url": _password_as_parameter(secret_role)})),
        "subscribe": (["subscribe", "--print-only"], config("subscribe")),
        # sends serving.api_key to a real HTTP server (the admin API, which knows no /v1/ route: refused)
        "subscribe-vllm": (
            ["subscribe", "--swapper", "vllm"],
            config("subscribe-vllm", serving={**base["serving"], "server_url": base_url,
                                              "download_dir": str(tmp_path / "adapters-vllm")}),
        ),
    }  # fmt: skip
    # The checks can fail: every secret, in the forms it is configured in, is in what the processes are given.
    for _, path in commands.values():
        assert {leak.split(" (")[0] for leak in known.leaks(path.read_text())} == set(values), path

    capture = Capture()
    processes = {
        name: process_tools.start(["--log-level", "DEBUG", *args], path, logs / f"{name}.log")
        for name, (args, path) in commands.items()
    }
    errors = asyncio.create_task(provoke_errors(capture, known, make_settings, base, secret_role, configs))
    codes: dict[str, int] = {}
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            await _release_one_version(http, settings, logs)
            await _capture_release(capture, settings, secret_s3)
            await _capture_api(capture, http, values["api.token"])
            async with httpx.AsyncClient(timeout=10) as plain:
                for name in ("worker", "subscribe"):
                    capture.http(f"{name} metrics", await plain.get(f"http://127.0.0.1:{ports[name]}/"))
            reads = await cli_all(capture, commands["run"][1], _READS)
            with_parameter = {
                "settings, DSN parameter": ["settings"],
                "settings --json, DSN parameter": ["settings", "--json"],
            }
            reads |= await cli_all(capture, commands["worker"][1], with_parameter)
            refused = await cli_all(capture, commands["run"][1], {"train, wrong token": ["train"]},
                                    STREAMENGINE_API_TOKEN="x1")  # fmt: skip
            # The worker keeps running through the outages below: it must wait them out and stop cleanly (0).
            await _capture_outages(capture, http, commands["run"][1], secret_s3, secret_role)
    finally:
        await asyncio.gather(errors, return_exceptions=True)
        for name, process in processes.items():
            codes[name] = await asyncio.to_thread(process_tools.stop, process, 60)
        await secret_role.admin(f"ALTER ROLE {secret_role.name} LOGIN")
    await _capture_leftovers(capture, tmp_path, secret_role, skipped={configs, tmp_path / "s3"})

    # Everything ran and every provoked error happened, as one clear line.
    assert codes == dict.fromkeys(commands, 0), codes
    for name in commands:
        assert " DEBUG " in capture.sources[f"file: logs/{name}.log"], name
    assert "refused adapter tiny-llama@v1.0" in capture.sources["file: logs/subscribe-vllm.log"]
    assert all(r.returncode == 0 for r in reads.values()), {n: r.stderr for n, r in reads.items() if r.returncode}
    assert refused["train, wrong token"].returncode == 2 and "HTTP 401" in refused["train, wrong token"].stderr
    failures = errors.result()
    assert set(failures) == set(_PROVOKED)
    for name, (code, phrase) in _PROVOKED.items():
        result = failures[name]
        last = (result.stderr.strip().splitlines() or [""])[-1]
        assert (result.returncode, phrase in last) == (code, True), (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-3000:])

    leaks = {name: known.leaks(text) for name, text in capture.sources.items()}
    print(f"\nsearched {len(capture.sources)} sources, {capture.total_bytes()} bytes, for {len(values)} secrets")
    assert {name: where for name, where in leaks.items() if where} == {}


_PROVOKED = {  # case -> (exit code, what its error line says)
    "run, wrong S3 secret key": (2, "refused bucket check"),
    "worker, wrong S3 access key": (2, "refused bucket check"),
    "run, PostgreSQL port closed": (3, "PostgreSQL at 127.0.0.1:"),
    "run, database missing": (3, "does not exist"),
    "run, DSN of another scheme": (2, "database.url (STREAMENGINE_DATABASE__URL)"),
    "run, DSN port not a number": (2, "database.url (STREAMENGINE_DATABASE__URL)"),
    "run, password not percent-encoded": (2, "database.url (STREAMENGINE_DATABASE__URL)"),
    "settings, invalid values beside secrets": (2, "storage.endpoint (STREAMENGINE_STORAGE__ENDPOINT)"),
    "settings, a secret of the wrong type": (2, "api.token (STREAMENGINE_API__TOKEN)"),
    "status, the token inside api.url": (3, "admin API at http://***@127.0.0.1:"),
    "settings, malformed JSON of a section holding a secret": (2, "STREAMENGINE_STORAGE"),
}


def _password_as_parameter(role: Role) -> str:
    parts = urlsplit(role.dsn)
    netloc = f"{role.name}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, query=f"password={role.quoted_password}"))


async def _release_one_version(http: httpx.AsyncClient, settings: Any, logs: Path) -> None:
    """Feedback in Kafka until the worker released v1.0 and the print-only subscriber has it."""

    async def healthy() -> bool:
        try:
            return (await http.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(healthy, timeout_s=120, interval_s=0.5)
    k = settings.kafka
    await produce(k.bootstrap_servers, k.feedback_topic, [feedback(i) for i in range(WINDOW)])

    async def released() -> bool:
        jobs = (await http.get("/training/status")).json()["jobs"]
        assert not any(j["state"] == "failed" for j in jobs), jobs
        return any(j["state"] == "released" for j in jobs)

    await wait_for(released, timeout_s=240, interval_s=1)
    for name, line in (
        ("subscribe", "tiny-llama v1.0 ready in"),
        ("subscribe-vllm", "refused adapter tiny-llama@v1.0"),
    ):
        await wait_for(partial(_log_has, logs / f"{name}.log", line), timeout_s=60, interval_s=0.5)


async def _capture_leftovers(capture: Capture, root: Path, role: Role, skipped: set[Path]) -> None:
    """Every row of the database and every file the processes wrote (their logs included)."""
    capture.add("database rows", await role.dump())

    def files() -> dict[str, bytes]:
        return {
            f"file: {path.relative_to(root)}": path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file() and not any(path.is_relative_to(folder) for folder in skipped)
        }

    for name, data in (await asyncio.to_thread(files)).items():
        capture.add(name, data)


_READS = {
    "status": ["status"],
    "status --json": ["status", "--json"],
    "health": ["health"],
    "health --json": ["health", "--json"],
    "settings": ["settings"],
    "settings --json": ["settings", "--json"],
    "metrics": ["metrics"],
    "metrics --json": ["metrics", "--json"],
    "adapters list": ["adapters", "list", "--json"],
    "adapters info": ["adapters", "info", "production"],
}


def _log_has(path: Path, text: str) -> Any:
    def has() -> bool:
        return path.is_file() and text in path.read_text(errors="replace")

    return asyncio.to_thread(has)


async def _capture_release(capture: Capture, settings: Any, s3: SeaweedS3) -> None:
    """The adapter.released record and every object stored in S3 (manifest, adapter, config)."""
    k = settings.kafka
    for topic in (k.released_topic, k.dlq_topic):
        records = await read_all(k.bootstrap_servers, topic)
        text = [f"key={r.key!r} headers={r.headers!r}\n{r.value.decode(errors='replace')}" for r in records]
        capture.add(f"kafka: {topic}", "\n".join(text))
    assert "adapter.released" in k.released_topic and capture.sources[f"kafka: {k.released_topic}"]

    def objects() -> dict[str, bytes]:
        client = s3.client()
        bucket = settings.storage.bucket
        names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
        return {name: client.get_object(bucket, name).read() for name in names if name}

    stored = await asyncio.to_thread(objects)
    assert any(name.endswith("manifest.json") for name in stored), sorted(stored)
    for name, data in stored.items():
        capture.add(f"s3: {name}", data)


async def _capture_api(capture: Capture, http: httpx.AsyncClient, token: str) -> None:
    for path in ("/health", "/health/live", "/metrics", "/training/status", "/adapters", "/adapters/production",
                 "/openapi.json", "/docs", "/no-such-route"):  # fmt: skip
        capture.http(f"GET {path}", await http.get(path))
    wrong = {"Authorization": "Bearer not-the-token"}
    capture.http("POST /train, no token", await http.post("/train"))
    capture.http("POST /train, wrong token", await http.post("/train", headers=wrong))
    capture.http("POST deploy, wrong token", await http.post("/adapters/v1.0/deploy", headers=wrong))
    right = {"Authorization": f"Bearer {token}"}
    invalid = await http.post("/train", headers=right, json={"model": "tiny-llama", "min_samples": token})
    assert invalid.status_code == 422, invalid.text
    capture.http("POST /train, the token as a value", invalid)
    refused = await http.post("/train", headers=right, json={"min_samples": 1000})
    assert refused.status_code == 409, refused.text
    capture.http("POST /train, too few samples", refused)


async def _capture_outages(capture: Capture, http: httpx.AsyncClient, config: Path, s3: SeaweedS3, role: Role) -> None:
    """S3 stops, then the role may no longer log in: /health and `streamengine health` say so."""
    await asyncio.to_thread(s3.stop)
    s3_down = await http.get("/health")
    assert s3_down.status_code == 503 and not s3_down.json()["checks"]["s3"]["ok"], s3_down.text
    capture.http("GET /health, S3 down", s3_down)
    await cli_all(capture, config, {"health, S3 down": ["health"]})
    await role.admin(
        f"ALTER ROLE {role.name} NOLOGIN",
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role.name}'",
    )

    async def postgres_down() -> httpx.Response | None:
        response = await http.get("/health")
        return None if response.json()["checks"]["postgres"]["ok"] else response

    capture.http("GET /health, PostgreSQL refuses the role", await wait_for(postgres_down, timeout_s=30))
    await cli_all(capture, config, {"health, PostgreSQL refuses the role": ["health", "--json"]})
    await role.admin(f"ALTER ROLE {role.name} LOGIN")
