"""`streamengine top`: a live view of one engine through its admin API.

Each refresh reads GET /models (the model lines and their window policy), /training/status and /adapters of
each line, /metrics (the ingest and DLQ counters: rates between two readings) and /fleet (``no fleet data``
where the engine serves none). On a terminal the view refreshes in place (rich Live, over SSH too; ``q``
quits); otherwise, and with ``--once``, it prints plain-text frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from streamengine.cli.base import State, client, console, pass_state
from streamengine.cli.output import duration, fleet_summary, metric_samples, progress_text
from streamengine.config.settings import Settings
from streamengine.errors import NotFound, StreamEngineError

if TYPE_CHECKING:
    from streamengine.api.client import AdminClient

JOBS_SHOWN = 4
RELEASES_SHOWN = 5
BAR_WIDTH = 30
CONSUMED, REJECTED = "streamengine_events_consumed_total", "streamengine_events_rejected_total"


@dataclass(frozen=True)
class Glyphs:
    full: str
    empty: str
    levels: str  # a sparkline's characters, lowest first


FANCY = Glyphs("█", "░", "▁▂▃▄▅▆▇█")
PLAIN = Glyphs("#", ".", "_.-=+*#")


@dataclass(frozen=True)
class Reading:
    """One refresh: what the admin API answered, and when."""

    at: float  # time.monotonic()
    now: datetime
    lines: list[dict[str, Any]]  # GET /models entries, each with its "status" and "adapters"
    counters: dict[str, float]  # CONSUMED, REJECTED (summed over labels)
    fleet: Any = None  # GET /fleet, None while the engine serves no fleet view


def read(client: AdminClient) -> Reading:
    lines = client.get("/models")
    for line in lines:
        line["status"] = client.get("/training/status", model=line["model"], limit=20)
        line["adapters"] = client.get("/adapters", model=line["model"])
    samples = metric_samples(client.request("GET", "/metrics").text, "streamengine_events_")
    counters = {name: sum(s["value"] for s in samples if s["name"] == name) for name in (CONSUMED, REJECTED)}
    try:
        fleet = client.get("/fleet")
    except NotFound:
        fleet = None
    return Reading(time.monotonic(), datetime.now(UTC), lines, counters, fleet)


def rate(previous: Reading | None, current: Reading, name: str) -> float | None:
    """Events per second of counter ``name`` between two readings (None: one reading, or the counter reset)."""
    if previous is None or current.at <= previous.at:
        return None
    change = current.counters[name] - previous.counters[name]
    return change / (current.at - previous.at) if change >= 0 else None


def bar(fraction: float, glyphs: Glyphs, width: int = BAR_WIDTH) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + glyphs.full * filled + glyphs.empty * (width - filled) + "]"


def sparkline(values: list[float], glyphs: Glyphs) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    top = len(glyphs.levels) - 1
    return "".join(glyphs.levels[round((v - low) / (high - low) * top) if high > low else 0] for v in values)


# --- the frame ----------------------------------------------------------------------------------------
def frame(current: Reading, previous: Reading | None, glyphs: Glyphs, url: str) -> list[Text]:
    """Every section of the view, one Text per line."""
    out = [Text(f"streamengine top  {url}  {current.now:%Y-%m-%d %H:%M:%S} UTC", style="bold")]
    out.append(_ingest_line(current, previous))
    for line in current.lines:
        out += _model_line(line, current.now, glyphs)
    out.append(Text("fleet", style="bold cyan"))
    out += _fleet_lines(current.fleet)
    return out


def _ingest_line(current: Reading, previous: Reading | None) -> Text:
    def per_s(name: str) -> str:
        value = rate(previous, current, name)
        return "-" if value is None else f"{value:.1f}"

    return Text.assemble(
        ("ingest ", "bold cyan"),
        f"{per_s(CONSUMED)} events/s  DLQ {per_s(REJECTED)} events/s  "
        f"(consumed {current.counters[CONSUMED]:.0f}, to the DLQ {current.counters[REJECTED]:.0f})",
    )


def _model_line(line: dict[str, Any], now: datetime, glyphs: Glyphs) -> list[Text]:
    status = line["status"]
    out = [
        Text.assemble(
            ("model ", "bold cyan"),
            (line["model"], "bold"),
            f"  production {status.get('production') or '-'}  previous {status.get('previous') or '-'}"
            f"  base {line['base_model']}",
        ),
        Text("  " + _window_text(status.get("open_window"), line["window"], glyphs) + _tick_text(status, now)),
    ]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status["jobs_by_state"].items())) or "none"
    out.append(Text(f"  jobs: {counts}"))
    running = [job for job in status["jobs"] if job["state"] == "running"]
    others = [job for job in status["jobs"] if job["state"] != "running"]
    out += [Text("  " + _job_text(job, glyphs)) for job in (running + others)[:JOBS_SHOWN]]
    out.append(Text("  releases (the gate: holdout improvement, worst forgetting):"))
    out += [Text("  " + _release_text(a)) for a in line["adapters"][:RELEASES_SHOWN]] or [Text("  none yet")]
    return out


def _window_text(window: dict[str, Any] | None, policy: dict[str, Any], glyphs: Glyphs) -> str:
    if window is None:
        return "window: none open"
    fills = [window["samples"] / policy["max_samples"]]
    weight = f"weight {window['weight']:.1f}"
    if policy.get("max_weight"):
        fills.append(window["weight"] / policy["max_weight"])
        weight += f"/{policy['max_weight']:g}"
    return (
        f"window {window['id']} {bar(max(fills), glyphs)} {window['samples']}/{policy['max_samples']} samples "
        f"({max(fills):.0%}), {weight}"
    )


def _tick_text(status: dict[str, Any], now: datetime) -> str:
    tick = status.get("next_tick_at")
    if not tick:
        return ""
    at = datetime.fromisoformat(tick)
    return f"  next tick in {duration((at - now).total_seconds())} ({at:%a %H:%M %Z})"


def _job_text(job: dict[str, Any], glyphs: Glyphs) -> str:
    head = f"job {job['id']} {job['state']:<8}"
    progress = job.get("progress") or {}
    if job["state"] != "running":
        version = f" {job['version']}" if job.get("version") else ""
        return f"{head}{version}  {progress_text(job)}".rstrip()
    phase = str(progress.get("phase") or "claimed").replace("_", " ")
    if progress.get("phase_elapsed_s") is not None:
        phase += f" {duration(progress['phase_elapsed_s'])}"
    text = f"{head} {phase}"
    step, total = progress.get("step"), progress.get("total_steps")
    if step and total:
        text += f"  {bar(step / total, glyphs, 20)} {step}/{total} steps  eta {duration(progress.get('eta_s'))}"
        losses = progress.get("recent_losses") or [progress.get("loss")]
        text += f"  loss {progress.get('loss', 0):.4f} {sparkline([x for x in losses if x is not None], glyphs)}"
    return text


def _release_text(adapter: dict[str, Any]) -> str:
    m, window = adapter.get("metrics") or {}, adapter.get("window") or {}

    def share(key: str) -> str:
        value = m.get(key)
        return "-" if value is None else f"{value:+.1%}"

    loss = ""
    if m.get("eval_loss_before") is not None and m.get("eval_loss_after") is not None:
        loss = f"loss {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}  "
    aliases, reason = ",".join(adapter.get("aliases") or []) or "-", adapter.get("reason") or "-"
    return (
        f"{adapter['version']:<6} {aliases:<10} {reason:<9} {window.get('samples', '-')} samples  "
        f"{loss}improvement {share('holdout_improvement')}  forgetting {share('forgetting')}  "
        f"{str(adapter['created_at'])[5:16].replace('T', ' ')}"
    )


def _fleet_lines(fleet: Any) -> list[Text]:
    lines = fleet.get("lines") if isinstance(fleet, dict) else None
    if not lines:
        return [Text("  no fleet data")]
    return [Text(f"  {line['model']}: {fleet_summary(line)}") for line in lines]


# --- showing it -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """``wait(seconds)`` -> the key pressed meanwhile ('' if none), with the terminal in cbreak mode (keys arrive
    at once, unechoed; Ctrl-C still interrupts). Without a terminal on stdin it only waits."""
    if not sys.stdin.isatty():

        def sleep(seconds: float) -> str:
            time.sleep(seconds)
            return ""

        yield sleep
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> str:
        ready, _, _ = select.select([fd], [], [], seconds)
        return os.read(fd, 1).decode(errors="replace") if ready else ""

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _safe_frame(client: AdminClient, previous: Reading | None, glyphs: Glyphs) -> tuple[list[Text], Reading | None]:
    """The next frame, or one line saying why the API could not be read (the view keeps trying)."""
    try:
        current = read(client)
    except StreamEngineError as exc:
        return [Text(f"streamengine top: {exc}", style="bold red")], previous
    return frame(current, previous, glyphs, client.base_url), current


def live(client: AdminClient, interval: float, out: Console, stopped: threading.Event | None = None) -> None:
    """Refresh in place every ``interval`` seconds until ``q`` is pressed, or ``stopped`` is set (then the view
    goes away; what was printed above it stays)."""
    previous: Reading | None = None
    transient, stopped = stopped is not None, stopped or threading.Event()
    with _keys() as wait, Live(console=out, auto_refresh=False, transient=transient) as view:
        while True:
            lines, previous = _safe_frame(client, previous, FANCY)
            if stopped.is_set():
                return
            view.update(Group(*lines, Text("q quits", style="dim")), refresh=True)
            if wait(interval).lower() == "q":
                return


def print_frames(client: AdminClient, interval: float, once: bool) -> None:
    """Plain text: one frame (after two readings ``interval`` apart, for the rates) or one every ``interval``."""
    previous = read(client)
    while True:
        time.sleep(interval)
        current = read(client)
        lines = frame(current, previous, PLAIN if not console.is_terminal else FANCY, client.base_url)
        if console.is_terminal:
            console.print(Group(*lines))
        else:
            click.echo("\n".join(line.plain for line in lines))
        if once:
            return
        click.echo("")
        previous = current


async def up_view(settings: Settings, stop: asyncio.Event) -> None:
    """The live view inside `streamengine up` (in a thread); ``q`` stops up as Ctrl-C does."""
    from streamengine.api.client import AdminClient

    loop = asyncio.get_running_loop()
    stopped = threading.Event()
    api = AdminClient(settings)

    def show() -> None:
        try:
            live(api, 1.0, console, stopped)
        finally:
            loop.call_soon_threadsafe(stop.set)

    viewing = asyncio.create_task(asyncio.to_thread(show))
    try:
        await stop.wait()
    finally:
        stopped.set()
        await viewing
        api.close()


@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts); rates span --interval.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.05), help="Seconds a refresh.")
@pass_state
def top(state: State, once: bool, interval: float) -> None:
    """A live view of the engine: ingest and DLQ rates, windows, jobs, releases and the fleet (q quits).

    Reads the admin API (api.url, api.token). On a terminal it refreshes in place; --once prints one frame,
    in plain text when the output is not a terminal (and every --interval seconds without --once).
    """
    api = client(state)
    try:
        if console.is_terminal and not once:
            live(api, interval, console)
        else:
            print_frames(api, interval, once)
    finally:
        api.close()
