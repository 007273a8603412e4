"""The `streamengine` command line. Every command has --help; errors print one line and exit non-zero.

Exit codes: 0 ok, 1 error, 2 bad setting or usage, 3 a service unreachable / unhealthy, 4 not found,
5 conflict, 6 integrity failure, 7 training failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from streamengine.config import Settings, load_settings
from streamengine.errors import ServiceUnavailable, StreamEngineError

T = TypeVar("T")
console = Console()


class State:
    def __init__(self, config_file: str | None) -> None:
        self.config_file = config_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file)
        return self._settings


pass_state = click.make_pass_decorator(State)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
model_option = click.option("--model", default=None, help="Model line (default: model.name from the settings).")


def run_until_signal(make: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run a long-lived coroutine; SIGINT/SIGTERM set its stop event for a clean shutdown."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await make(stop)

    return asyncio.run(runner())


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML settings file (also STREAMENGINE_CONFIG). Environment variables win over it.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.version_option(package_name="streamengine")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str) -> None:
    """streamengine: continual learning for LLM serving fleets.

    Feedback events in Kafka become weighted samples in PostgreSQL; full windows train LoRA adapters
    (with EWC) that are stored in S3 and announced on `adapter.released` for serving nodes to hot-swap.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "faust", "mode", "httpx", "urllib3", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(log_level.upper())))
    ctx.obj = State(config_file)


# --- long-running processes -------------------------------------------------------------------------
@cli.command()
@pass_state
def run(state: State) -> None:
    """Run ingest, the scheduler, the outbox relay and the admin API (scale with replicas)."""
    from streamengine.engine import run_engine

    settings = state.settings
    run_until_signal(lambda stop: run_engine(settings, stop=stop))


@cli.command()
@click.option("--once", is_flag=True, help="Process at most one job, then exit.")
@pass_state
def worker(state: State, once: bool) -> None:
    """Run a trainer worker: claim jobs from PostgreSQL, train, upload, release."""
    from streamengine.jobs.worker import serve_worker

    settings = state.settings
    run_until_signal(lambda stop: serve_worker(settings, stop, once=once))


@cli.command()
@click.option(
    "--dir",
    "home",
    type=click.Path(file_okay=False),
    default=".streamengine/up",
    show_default=True,
    help="Where the embedded services keep their data and logs.",
)
@click.option("--events", default=400, show_default=True, help="Demo feedback events to produce (0: none).")
@click.option("--window", "window_samples", default=64, show_default=True, help="Samples per training window.")
@click.option("--exit-after", default=0, show_default=True, help="Stop after this many releases (0: run until Ctrl-C).")
def up(home: str, events: int, window_samples: int, exit_after: int) -> None:
    """Run everything on embedded defaults: broker, PostgreSQL, S3, a tiny model, engine, worker, demo."""
    from streamengine.up import run_up

    run_until_signal(lambda stop: run_up(Path(home).absolute(), events, window_samples, exit_after, stop))


@cli.command()
@click.option("--model", "model_name", default=None, help="Model line to follow (default: model.name).")
@click.option("--base", default=None, help="Base model folder to hot-swap into (default: model.base).")
@click.option("--print-only", is_flag=True, help="Download and verify, but load no model (prints each version).")
@pass_state
def subscribe(state: State, model_name: str | None, base: str | None, print_only: bool) -> None:
    """Serving-node side: follow adapter.released, verify, download and hot-swap each version."""
    from streamengine.serving.run import serve_subscriber

    settings = state.settings
    run_until_signal(lambda stop: serve_subscriber(settings, stop, model_name, base, print_only))


# --- producing ---------------------------------------------------------------------------------------
@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--topic", default=None, help="Topic (default: kafka.feedback_topic).")
@click.option("--send-invalid", is_flag=True, help="Send invalid lines too (they will land in the DLQ).")
@pass_state
def produce(state: State, file: str, topic: str | None, send_invalid: bool) -> None:
    """Validate FILE.jsonl (one FeedbackEvent per line) and send it to Kafka.

    Invalid lines are reported with their line numbers and skipped (exit code 1) unless --send-invalid.
    """
    from streamengine.produce import prepare, send

    settings = state.settings
    with click.open_file(file, "rb") as stream:
        prepared = prepare(stream, settings.kafka.max_record_bytes, keep_invalid=send_invalid)
    for line_no, message in prepared.invalid:
        click.echo(f"{file}:{line_no}: {message}", err=True)
    target = topic or settings.kafka.feedback_topic
    kafka_log = logging.getLogger("aiokafka")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        kafka_log.setLevel(logging.CRITICAL)  # an unreachable broker is reported once, as our own error line
    sent = asyncio.run(send(settings, target, prepared.records))
    note = " (sent anyway)" if send_invalid and prepared.invalid else ""
    click.echo(f"sent {sent} records to {target}; {len(prepared.invalid)} invalid lines{note}")
    if prepared.invalid and not send_invalid:
        sys.exit(1)


# --- operations through the admin API ----------------------------------------------------------------
def _client(state: State) -> Any:
    from streamengine.client import AdminClient

    return AdminClient(state.settings)


@cli.command()
@model_option
@click.option("--min-samples", default=1, show_default=True, help="Refuse if the window holds fewer samples.")
@json_option
@pass_state
def train(state: State, model: str | None, min_samples: int, as_json: bool) -> None:
    """Close the open window now and queue a training job (reason `manual`)."""
    result = _client(state).post("/train", {"model": model, "min_samples": min_samples})
    if as_json:
        _print_json(result)
    else:
        click.echo(
            f"job {result['job_id']} queued: window {result['window_id']}, {result['samples']} samples, "
            f"weight {result['weight']:.2f}"
        )


@cli.command()
@model_option
@click.option("--limit", default=20, show_default=True, help="How many recent jobs to show.")
@json_option
@pass_state
def status(state: State, model: str | None, limit: int, as_json: bool) -> None:
    """Training status: open window, production version, recent jobs with progress."""
    data = _client(state).get("/training/status", model=model, limit=limit)
    if as_json:
        _print_json(data)
        return
    window = data["open_window"] or {}
    console.print(
        f"model [bold]{data['model']}[/]  production [bold]{data['production'] or '-'}[/]  "
        f"open window: {window.get('samples', 0)} samples, weight {window.get('weight', 0):.2f}"
    )
    table = Table("job", "window", "reason", "state", "attempts", "version", "progress / error")
    for job in data["jobs"]:
        progress = job["progress"] or {}
        detail = job["error"] or (
            f"step {progress.get('step')}/{progress.get('total_steps')} loss {progress.get('loss', 0):.4f}"
            if progress.get("step")
            else progress.get("phase", "")
        )
        table.add_row(
            str(job["id"]),
            str(job["window_id"]),
            job["reason"],
            job["state"],
            str(job["attempts"]),
            job["version"] or "-",
            detail,
        )
    console.print(table)


@cli.command()
@pass_state
def metrics(state: State) -> None:
    """Print the engine's Prometheus metrics."""
    click.echo(_client(state).request("GET", "/metrics").text, nl=False)


@cli.command()
@json_option
@pass_state
def health(state: State, as_json: bool) -> None:
    """Check the engine and its Kafka, PostgreSQL and S3 (exit 3 when anything is down)."""
    data = _client(state).request("GET", "/health", ok=(200, 503)).json()
    if as_json:
        _print_json(data)
    else:
        for name, check in data["checks"].items():
            click.echo(f"{name:9} {'ok' if check['ok'] else 'DOWN'} {check.get('detail', '')}".rstrip())
        click.echo(f"status: {data['status']}")
    if data["status"] != "ok":
        raise ServiceUnavailable("engine", state.settings.api.base_url(), "a dependency is down")


@cli.group()
def adapters() -> None:
    """List, inspect, deploy and roll back adapter versions."""


def _adapter_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("version", "aliases", "parent", "reason", "samples", "loss before", "loss after", "size", "created")
    for a in rows:
        m = a.get("metrics") or {}
        window = a.get("window") or {}

        def num(v: Any) -> str:
            return f"{v:.4f}" if isinstance(v, int | float) else "-"

        table.add_row(
            a["version"],
            ",".join(a["aliases"]) or "-",
            a["parent_version"] or "-",
            a.get("reason") or "-",
            str(window.get("samples", "-")),
            num(m.get("eval_loss_before")),
            num(m.get("eval_loss_after")),
            f"{a['size_bytes'] / 1024:.0f} KiB",
            str(a["created_at"])[:19],
        )
    return table


@adapters.command("list")
@model_option
@json_option
@pass_state
def adapters_list(state: State, model: str | None, as_json: bool) -> None:
    """List the versions of a model line, newest first."""
    rows = _client(state).get("/adapters", model=model)
    _print_json(rows) if as_json else console.print(_adapter_table(rows))


@adapters.command("info")
@click.argument("version")
@model_option
@json_option
@pass_state
def adapters_info(state: State, version: str, model: str | None, as_json: bool) -> None:
    """Show one version (or alias: production, previous)."""
    data = _client(state).get(f"/adapters/{version}", model=model)
    if as_json:
        _print_json(data)
    else:
        console.print(_adapter_table([data]))
        console.print(f"uri: {data['uri']}")


@adapters.command("deploy")
@click.argument("version")
@model_option
@pass_state
def adapters_deploy(state: State, version: str, model: str | None) -> None:
    """Make VERSION the production adapter and announce it to the fleet."""
    result = _client(state).post(f"/adapters/{version}/deploy", model=model)
    click.echo(f"{result['model']} {result['version']} deployed (event {result['event_id']})")


@adapters.command("rollback")
@model_option
@pass_state
def adapters_rollback(state: State, model: str | None) -> None:
    """Return production to the previous version and announce it to the fleet."""
    result = _client(state).post("/adapters/rollback", model=model)
    click.echo(f"{result['model']} rolled back to {result['version']} (event {result['event_id']})")


# The seed's flat command names, kept for its users.
cli.add_command(adapters_list, "list-adapters")
cli.add_command(adapters_info, "adapter-info")
cli.add_command(adapters_deploy, "deploy")


# --- contract ----------------------------------------------------------------------------------------
@cli.command()
@click.option("--write", "mode", flag_value="write", help="Regenerate schemas/, topics/ and asyncapi.yaml.")
@click.option("--check", "mode", flag_value="check", default=True, help="Fail when the files drift (default).")
@click.option("--root", type=click.Path(file_okay=False), default=".", show_default=True)
def contract(mode: str, root: str) -> None:
    """Generate or check the contract files (JSON Schemas, topic definitions, AsyncAPI)."""
    from streamengine import contract as contract_files

    if mode == "write":
        changed = contract_files.write(Path(root))
        click.echo("updated: " + (", ".join(changed) if changed else "nothing"))
        return
    drifted = contract_files.drift(Path(root))
    if drifted:
        raise click.ClickException(
            "contract files drifted from the code: " + ", ".join(drifted) + " (run `streamengine contract --write`)"
        )
    click.echo("contract files match the code")


def main() -> None:
    try:
        cli.main(prog_name="streamengine", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except StreamEngineError as exc:
        click.echo(f"streamengine: error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
