"""Readable tables of the CLI (rich), kept apart from the commands. JSON output is the API's own."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from streamengine.config.reference import SettingInfo, mask


def duration(seconds: Any) -> str:
    """``95`` -> ``1m35s``; ``-`` when unknown."""
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def progress_text(job: dict[str, Any]) -> str:
    """What a job is doing or why it ended: the phase and how long it has been in it, then step, loss,
    throughput and ETA while training; the error after."""
    if job.get("error"):
        return str(job["error"])
    if job["state"] == "queued" and job.get("waiting"):
        return str(job["waiting"])
    progress = job.get("progress") or {}
    phase = f"{str(progress.get('phase') or '').replace('_', ' ')} {duration(progress.get('phase_elapsed_s'))}"
    if job["state"] == "running" and progress.get("step"):
        parts = [phase, f"step {progress['step']}/{progress.get('total_steps', '?')}"]
        if progress.get("epoch"):
            parts.append(f"epoch {progress['epoch']}")
        parts.append(f"loss {_num(progress.get('loss'))}")
        if progress.get("tokens_per_s"):
            parts.append(f"{progress['tokens_per_s']:.0f} tok/s")
        parts.append(f"eta {duration(progress.get('eta_s'))}")
        return ", ".join(parts)
    if job["state"] == "released":
        metrics = job.get("metrics") or {}
        before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
        return f"eval loss {_num(before)} -> {_num(after)}" if before is not None else ""
    return phase if job["state"] == "running" and progress.get("phase") else str(progress.get("phase") or "")


def rollout_text(trial: dict[str, Any]) -> str:
    """A canary trial in a few lines: its nodes, its state, and the (latest) decision's numbers."""
    decision = trial.get("decision") or {}
    lines = [
        f"canary: {trial['state']} against {trial['production_version']} on {', '.join(trial['canary_nodes'])},"
        f" started {str(trial['started_at'])[:19]}"
        + (f", ended {str(trial['decided_at'])[:19]}" if trial.get("decided_at") else "")
    ]
    if decision:
        lines.append(
            f"decision: {decision.get('action')} ({decision.get('rule')}, by {decision.get('by')}):"
            f" {decision.get('reason')}"
        )
        for side in ("canary", "production"):
            counts = decision.get(side) or {}
            share = counts.get("negative_share")
            lines.append(
                f"  {side}: {counts.get('events', 0)} events ({counts.get('effective_events', 0):.0f} after the"
                f" per-user cap), negative share {'-' if share is None else f'{share:.1%}'}"
            )
    return "\n".join(lines)


def status_header(data: dict[str, Any]) -> str:
    window = data.get("open_window") or {}
    counts = ", ".join(f"{n} {s}" for s, n in sorted((data.get("jobs_by_state") or {}).items())) or "none"
    canary = f"  canary [bold]{data['canary']}[/] on trial" if data.get("canary") else ""
    return (
        f"model [bold]{data['model']}[/]  production [bold]{data.get('production') or '-'}[/]"
        f"  previous {data.get('previous') or '-'}{canary}\n"
        f"open window: {window.get('samples', 0)} samples, weight {window.get('weight', 0):.2f}"
        f"  next tick: {str(data.get('next_tick_at') or '-')[:19]}\n"
        f"jobs: {counts}"
    )


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table("job", "window", "reason", "state", "attempts", "version", "created", "progress / result / error")
    for job in jobs:
        table.add_row(
            str(job["id"]),
            str(job["window_id"]),
            job["reason"],
            job["state"],
            str(job["attempts"]),
            job.get("version") or "-",
            str(job["created_at"])[:19],
            progress_text(job),
        )
    return table


def fleet_summary(line: dict[str, Any]) -> str:
    """One model line of GET /fleet in a line: live nodes per version and stage, failed and silent nodes."""
    versions = ", ".join(f"{v['nodes']} {v['stage']} {v['version'] or 'base'}" for v in line["versions"]) or "none"
    return f"{line['live']} live ({versions}), {line['failed']} failed, {line['silent']} silent"


def fleet_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table("node", "version", "stage", "state", "target", "heartbeat", "note")
    for node in nodes:
        note = "silent" if node["silent"] else ""
        if not node.get("canary", True):
            note = f"{note}; no canaries" if note else "no canaries"
        if node["reason"]:
            note = f"{note}; {node['reason']}" if note else node["reason"]
        table.add_row(
            node["node_id"],
            node["version"] or "base",
            node["stage"],
            node["state"],
            node["target_version"] or "-",
            str(node["heartbeat_at"])[:19],
            note[:120],
        )
    return table


def lines_table(lines: list[dict[str, Any]]) -> Table:
    table = Table("model", "base", "pattern", "window closes at", "tick")
    for line in lines:
        window = line["window"]
        weight = f" or weight {window['max_weight']}" if window["max_weight"] else ""
        closes = f"{window['max_samples']} samples{weight}"
        table.add_row(line["model"], line["base_model"], line.get("pattern") or "-", closes, window["schedule"])
    return table


def adapters_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "version", "aliases", "stage", "parent", "reason", "samples", "loss before", "loss after", "size", "created"
    )
    for a in rows:
        m = a.get("metrics") or {}
        window = a.get("window") or {}
        table.add_row(
            a["version"],
            ",".join(a["aliases"]) or "-",
            a.get("stage") or "-",
            a["parent_version"] or "-",
            a.get("reason") or "-",
            str(window.get("samples", "-")),
            _num(m.get("eval_loss_before")),
            _num(m.get("eval_loss_after")),
            f"{a['size_bytes'] / 1024:.0f} KiB",
            str(a["created_at"])[:19],
        )
    return table


def health_table(data: dict[str, Any]) -> Table:
    table = Table("check", "state", "seconds", "detail")
    for name, check in data["checks"].items():
        table.add_row(name, "ok" if check["ok"] else "DOWN", f"{check.get('seconds', 0):.3f}", check.get("detail", ""))
    return table


def settings_table(rows: list[SettingInfo]) -> Table:
    table = Table("setting", "environment variable", "value", "default")
    table.columns[0].no_wrap = table.columns[1].no_wrap = True
    for r in rows:
        changed = r.value != (mask(r.default) if r.secret else r.default)
        table.add_row(r.path, r.env, (r.value or "(unset)") + (" *" if changed else ""), r.default or "(unset)")
    return table


def metric_samples(text: str, prefix: str) -> list[dict[str, Any]]:
    """Samples of the Prometheus text ``text`` whose name starts with ``prefix``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        {"name": sample.name, "labels": sample.labels, "value": sample.value}
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefix)
    ]
