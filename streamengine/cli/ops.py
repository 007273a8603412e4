"""The CLI's read commands against the admin API and its reference output: status, metrics, health,
settings, openapi, models; and `forget` (registered on the `streamengine` group by :mod:`streamengine.cli.main`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamengine.cli.base import State, client, console, json_option, model_option, pass_state, print_json
from streamengine.errors import NotFound, ServiceUnavailable


@click.command()
@model_option
@click.option("--limit", default=20, show_default=True, help="How many recent jobs to show.")
@json_option
@pass_state
def status(state: State, model: str | None, limit: int, as_json: bool) -> None:
    """Training status: open window, production version, next tick, recent jobs with progress or error; the
    fleet: serving nodes by version and stage, failed and silent ones."""
    from streamengine.cli.output import fleet_summary, fleet_table, jobs_table, status_header

    api = client(state)
    data = api.get("/training/status", model=model, limit=limit)
    try:
        lines = api.get("/fleet", model=data["model"])["lines"]
    except NotFound:  # an engine from before the fleet view
        lines = None
    fleet = lines[0] if lines else None
    if as_json:
        print_json({**data, "fleet": fleet})
        return
    console.print(status_header(data))
    console.print(jobs_table(data["jobs"]))
    if not fleet:
        console.print("fleet: no serving node has reported (adapter.status)")
        return
    console.print(f"fleet: {fleet_summary(fleet)}")
    console.print(fleet_table(fleet["nodes"]))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the samples as JSON (name, labels, value).")
@click.option("--prefix", default="streamengine_", show_default=True, help="Only metrics whose name starts so.")
@pass_state
def metrics(state: State, as_json: bool, prefix: str) -> None:
    """Print the engine's Prometheus metrics (text format, or JSON)."""
    from streamengine.cli.output import metric_samples

    samples = metric_samples(client(state).request("GET", "/metrics").text, prefix)
    if as_json:
        print_json(samples)
        return
    for sample in samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sample["labels"].items())
        click.echo(f"{sample['name']}{{{labels}}} {sample['value']:g}".replace("{}", ""))


@click.command()
@json_option
@pass_state
def health(state: State, as_json: bool) -> None:
    """Check the engine and its Kafka, PostgreSQL and S3 (exit 3 when anything is down)."""
    from streamengine.cli.output import health_table

    data = client(state).request("GET", "/health", ok=(200, 503)).json()
    if as_json:
        print_json(data)
    else:
        console.print(health_table(data))
        click.echo(f"status: {data['status']}")
    if data["status"] != "ok":
        down = ", ".join(name for name, check in data["checks"].items() if not check["ok"])
        raise ServiceUnavailable("engine", state.settings.api.base_url(), f"not ready ({down})")


@click.command("settings")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
@click.option("--defaults", is_flag=True, help="Show the defaults, ignoring environment and config file.")
@click.option("--markdown", is_flag=True, help="Print the configuration reference as a Markdown table.")
@click.option(
    "--update-doc",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Rewrite the reference block of this Markdown file (docs/operations.md).",
)
@pass_state
def settings_command(state: State, as_json: bool, defaults: bool, markdown: bool, update_doc: str | None) -> None:
    """Every setting with its environment variable, current value and default (secrets masked)."""
    from streamengine.cli.output import settings_table
    from streamengine.config import reference as settings_ref

    rows = settings_ref.describe(None if defaults or markdown or update_doc else state.settings)
    if update_doc:
        changed = settings_ref.update_doc(Path(update_doc), rows)
        click.echo(f"{update_doc}: {'updated' if changed else 'already current'}")
    elif markdown:
        click.echo(settings_ref.markdown(rows), nl=False)
    elif as_json:
        print_json([r.as_dict() for r in rows])
    else:
        console.print(settings_table(rows))


@click.command()
def openapi() -> None:
    """Print the admin API's OpenAPI document (docs/openapi.json)."""
    from streamengine.api.app import openapi_document

    click.echo(json.dumps(openapi_document(), indent=2, sort_keys=True))


@click.command()
@click.option("--user-id", required=True, help="The user_id of the user's feedback events.")
@json_option
@pass_state
def forget(state: State, user_id: str, as_json: bool) -> None:
    """Delete every stored sample of a user and list the adapter versions trained on them.

    Released adapters are not unlearned: the versions whose window held the samples keep what they
    learned, and so may later versions (each continues from its parent, and replay draws from earlier
    windows). The next versions no longer see the data. The engine logs the request by its id, without
    the user id. Feedback that arrives afterwards is stored as usual.
    """
    result = client(state).post("/users/forget", {"user_id": user_id})
    if as_json:
        print_json(result)
        return

    def versions(refs: list[dict[str, str]]) -> str:
        return ", ".join(f"{r['model']} {r['version']}" + (" (deleted)" if r["deleted"] else "") for r in refs) or "-"

    click.echo(f"deleted {result['deleted_samples']} samples (request {result['request_id']})")
    click.echo(f"released versions trained on them (not unlearned): {versions(result['trained_on'])}")
    later = versions(result["later_versions"])
    click.echo(f"later versions that continue from them or may have replayed them: {later}")
    if result["running_jobs"]:
        click.echo("jobs running now that may have read them: " + ", ".join(map(str, result["running_jobs"])))


@click.command()
@json_option
@pass_state
def models(state: State, as_json: bool) -> None:
    """The model lines the engine serves (GET /models): base model, the pattern a line matches, window policy."""
    from streamengine.cli.output import lines_table

    data = client(state).get("/models")
    if as_json:
        print_json(data)
        return
    console.print(lines_table(data))


COMMANDS = [status, metrics, health, settings_command, openapi, forget, models]
