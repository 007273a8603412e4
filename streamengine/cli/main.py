"""The `streamengine` command line. Every command has --help; errors print one line and exit non-zero.

Exit codes (for scripts):
  0  ok
  1  error (anything not below; also `produce` with invalid lines)
  2  bad setting or usage: invalid value or config file, unknown option, request refused as invalid
     (HTTP 422) or unauthorized (HTTP 401: api.token / STREAMENGINE_API__TOKEN), port taken
  3  a service is unreachable or unhealthy: admin API, Kafka, PostgreSQL, S3 (`health` when degraded)
  4  not found: model line, adapter version or alias
  5  conflict: e.g. `train` with an empty window, `adapters rollback` with no previous version
  6  integrity failure: an artifact's hash or signature does not match
  7  training failure
  130 interrupted (Ctrl-C)

Reads (`status`, `health`, `adapters list|info`, `metrics`, `settings`) take --json for scripts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from streamengine import logs
from streamengine.cli import ops as cli_ops
from streamengine.cli import top as cli_top
from streamengine.cli.base import (
    State,
    json_option,
    model_option,
    pass_state,
    run_until_signal,
)
from streamengine.cli.base import client as _client
from streamengine.cli.base import console as console
from streamengine.cli.base import print_json as _print_json
from streamengine.core.job_states import FINISHED_STATES
from streamengine.errors import StreamEngineError


class _Cli(click.Group):
    """Turns a StreamEngineError of any command into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StreamEngineError as exc:
            message = ctx.obj.scrub(str(exc)) if isinstance(ctx.obj, State) else str(exc)
            click.echo(f"streamengine: error: {message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
    logs.configure(log_level)  # configured secrets never reach a log line
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
@click.option("--seed", default=0, show_default=True, help="Seed of the demo's language, base model and feedback.")
@click.option("--no-top", is_flag=True, help="Plain [up] lines only, without the live view (`streamengine top`).")
@click.option(
    "--lines",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Model lines of the demo's base, each taught its own facts (at most 4; canary trials with 1 only); "
    "--exit-after counts the releases of each.",
)
@click.option("--keep-db", is_flag=True, help="Keep the demo's PostgreSQL database at exit (dropped by default).")
@click.pass_context
def up(
    ctx: click.Context,
    home: str,
    events: int,
    window_samples: int,
    exit_after: int,
    seed: int,
    no_top: bool,
    lines: int,
    keep_db: bool,
) -> None:
    """Run everything on embedded defaults: broker, PostgreSQL, S3, a tiny model, engine, worker, demo.

    Prints its own [up] lines (services, each release and swap, the serving node's answers before and after)
    and warnings; the full log is in DIR/logs. On a terminal the live view of `streamengine top` runs below
    them (q or Ctrl-C stops). `streamengine --log-level debug up` (or any level asked for) prints the log here too.
    """
    from streamengine.local.up import UpOptions, run_up

    quiet = ctx.find_root().get_parameter_source("log_level") is click.core.ParameterSource.DEFAULT
    view = cli_top.up_view if console.is_terminal and not no_top else None
    options = UpOptions(events, window_samples, exit_after, seed, quiet, view, lines, keep_db)
    home_dir = Path(home).absolute()
    run_until_signal(lambda stop: run_up(home_dir, options, stop))


@cli.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Model line to follow; repeat for several (default: the lines the settings name: model.name or models:).",
)
@click.option("--base", default=None, help="Base model folder to hot-swap into (default: model.base).")
@click.option(
    "--every-line",
    is_flag=True,
    help="Follow every line whose releases carry the base model (--base or model.base), also lines released later.",
)
@click.option("--print-only", is_flag=True, help="Download and verify, but load no model (prints each version).")
@click.option(
    "--swapper",
    "swapper_kind",
    type=click.Choice(["peft", "vllm", "sglang", "max", "print"]),
    default=None,
    help="How to serve each version: in-process PEFT, an inference server's LoRA API, or print (default: "
    "serving.swapper). See docs/serving.md.",
)
@pass_state
def subscribe(
    state: State,
    models: tuple[str, ...],
    base: str | None,
    every_line: bool,
    print_only: bool,
    swapper_kind: str | None,
) -> None:
    """Serving-node side: follow adapter.released, verify, download and hot-swap each version of each line."""
    from streamengine.serving.run import serve_subscriber

    settings = state.settings
    run_until_signal(lambda stop: serve_subscriber(settings, stop, models, base, print_only, swapper_kind, every_line))


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
    from streamengine.stream.produce import prepare, send

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
@cli.command()
@model_option
@click.option("--min-samples", default=1, show_default=True, help="Refuse (exit 5) if the window holds fewer samples.")
@click.option("--major", is_flag=True, help="Release the next major version (vN+1.0) instead of a minor bump.")
@json_option
@pass_state
def train(state: State, model: str | None, min_samples: int, major: bool, as_json: bool) -> None:
    """Close the open window now and queue a training job (reason `manual`)."""
    result = _client(state).post("/train", {"model": model, "min_samples": min_samples}, major=major or None)
    if as_json:
        _print_json(result)
    else:
        click.echo(
            f"job {result['job_id']} queued: window {result['window_id']}, {result['samples']} samples, "
            f"weight {result['weight']:.2f}"
        )


@cli.command()
@model_option
@click.option("--version", default="production", show_default=True, help="Released version or alias.")
@click.option("--wait", is_flag=True, help="Wait until a worker has computed and stored it.")
@json_option
@pass_state
def fisher(state: State, model: str | None, version: str, wait: bool, as_json: bool) -> None:
    """Compute and store the Fisher information of a released version (a worker job).

    The diagonal Fisher of the version's LoRA parameters on its window, accumulated onto its parent's
    (online EWC), is stored beside the adapter; the next training job regularises towards it.
    """
    client = _client(state)
    result = client.post("/fisher/calculate", {"model": model, "version": version})
    if wait:
        result = _wait_for_job(client, result["model"], result["job_id"]) | result
    if as_json:
        _print_json(result)
    elif wait:
        click.echo(
            f"Fisher of {result['model']} {result['version']} stored (job {result['job_id']}: "
            f"{result['metrics'].get('fisher_file')})"
        )
    else:
        click.echo(f"job {result['job_id']} queued: Fisher of {result['model']} {result['version']}")


def _wait_for_job(client: Any, model: str, job_id: int, poll_s: float = 1.0) -> dict[str, Any]:
    while True:
        status = client.get("/training/status", model=model, limit=500)
        job = next((j for j in status["jobs"] if j["id"] == job_id), None)
        if job and job["state"] in FINISHED_STATES:
            if job["state"] == "failed":
                raise StreamEngineError(f"job {job_id} failed: {job['error']}")
            return dict(job)
        time.sleep(poll_s)


@cli.group()
def adapters() -> None:
    """List, inspect, deploy and roll back adapter versions."""


@adapters.command("list")
@model_option
@json_option
@pass_state
def adapters_list(state: State, model: str | None, as_json: bool) -> None:
    """List the versions of a model line, newest first."""
    from streamengine.cli.output import adapters_table

    rows = _client(state).get("/adapters", model=model)
    _print_json(rows) if as_json else console.print(adapters_table(rows))


@adapters.command("info")
@click.argument("version")
@model_option
@json_option
@pass_state
def adapters_info(state: State, version: str, model: str | None, as_json: bool) -> None:
    """Show one version (or alias: production, previous, canary), its stage and its canary's decision."""
    from streamengine.cli.output import adapters_table, rollout_text

    data = _client(state).get(f"/adapters/{version}", model=model)
    if as_json:
        _print_json(data)
    else:
        console.print(adapters_table([data]))
        console.print(f"uri: {data['uri']}")
        console.print(f"stage: {data['stage']}")
        if data.get("rollout"):
            console.print(rollout_text(data["rollout"]))


@adapters.command("deploy")
@click.argument("version")
@model_option
@json_option
@pass_state
def adapters_deploy(state: State, version: str, model: str | None, as_json: bool) -> None:
    """Make VERSION the production adapter and announce it to the fleet."""
    result = _client(state).post(f"/adapters/{version}/deploy", model=model)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['model']} {result['version']} deployed (event {result['event_id']})")


@adapters.command("rollback")
@model_option
@json_option
@pass_state
def adapters_rollback(state: State, model: str | None, as_json: bool) -> None:
    """Return production to the previous version and announce it to the fleet."""
    result = _client(state).post("/adapters/rollback", model=model)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['model']} rolled back to {result['version']} (event {result['event_id']})")


@adapters.command("promote")
@model_option
@json_option
@pass_state
def adapters_promote(state: State, model: str | None, as_json: bool) -> None:
    """Promote the canary on trial now: it becomes production on every node."""
    result = _client(state).post("/adapters/promote", model=model)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['model']} {result['version']} promoted to production (canary ended by hand)")


@adapters.command("abort")
@model_option
@json_option
@pass_state
def adapters_abort(state: State, model: str | None, as_json: bool) -> None:
    """Abort the canary on trial: its nodes go back to production."""
    result = _client(state).post("/adapters/abort", model=model)
    if as_json:
        _print_json(result)
    else:
        click.echo(
            f"{result['model']} canary {result['version']} aborted; production stays {result['production_version']}"
        )


@adapters.command("delete")
@click.argument("version")
@model_option
@json_option
@pass_state
def adapters_delete(state: State, version: str, model: str | None, as_json: bool) -> None:
    """Delete VERSION from the registry (kept as a tombstone) and S3; refused for aliased versions."""
    params = {"model": model} if model else {}
    result = _client(state).request("DELETE", f"/adapters/{version}", params=params).json()
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['model']} {version} deleted ({result['objects']} objects removed)")


@adapters.command("gc")
@click.option("--keep", default=10, show_default=True, help="Newest versions to keep besides aliased ones.")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@model_option
@json_option
@pass_state
def adapters_gc(state: State, keep: int, dry_run: bool, model: str | None, as_json: bool) -> None:
    """Delete old versions (never production, previous or a running job's parent) and failed uploads."""
    from rich.table import Table

    result = _client(state).post("/adapters/gc", model=model, keep=keep, dry_run=dry_run or None)
    if as_json:
        _print_json(result)
        return
    table = Table("deleted" if not dry_run else "would delete", "failed uploads swept", "kept")
    table.add_row(", ".join(result["deleted"]) or "-", ", ".join(result["orphans"]) or "-", ", ".join(result["kept"]))
    console.print(table)
    click.echo(f"{result['objects']} objects removed" if not dry_run else "dry run: nothing removed")


for _command in cli_ops.COMMANDS:  # status, metrics, health, settings, openapi, forget, models
    cli.add_command(_command)
cli.add_command(cli_top.top)

# Older flat command names, still accepted.
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
    from streamengine.contract import generate as contract_files

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
        code = cli.main(prog_name="streamengine", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
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
