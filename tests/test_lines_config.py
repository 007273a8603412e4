"""Model lines in configuration: models: entries (YAML and environment), patterns, per-line overrides, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streamengine.config.lines import Lines, for_line, line_names, matches
from streamengine.config.reference import describe
from streamengine.config.settings import CONFIG_ENV, ENV_PREFIX, load_settings
from streamengine.errors import ConfigError

LINES_YAML = """
model:
  base: /models/shared
window:
  max_samples: 100
ewc:
  lambda: 250
models:
  - name: support
    base: /models/small
    window: {max_samples: 5}
  - name: search
  - pattern: tenant-*
    lora: {r: 4}
    learning: {self_anchor: {samples: 8}}
  - pattern: "*"
    training: {epochs: 1}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in [v for v in os.environ if v.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


def test_without_models_the_only_line_is_model_name() -> None:
    settings = load_settings(model={"name": "solo"})
    assert line_names(settings) == ["solo"]
    assert matches(settings, "solo") and not matches(settings, "other")
    assert for_line(settings, "solo") is settings
    with pytest.raises(ConfigError, match="'other' matches no configured line \\(solo\\)"):
        for_line(settings, "other")


def test_entries_patterns_and_overrides_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(LINES_YAML)
    settings = load_settings(path)
    assert line_names(settings) == ["support", "search"]
    support = for_line(settings, "support")
    assert (support.model.name, support.model.base, support.window.max_samples) == ("support", "/models/small", 5)
    assert support.ewc.lambda_ == 250  # not overridden: the top level's
    search = for_line(settings, "search")
    assert (search.model.base, search.window.max_samples, search.training.epochs) == ("/models/shared", 100, 3)
    tenant = for_line(settings, "tenant-7")  # the first matching pattern wins
    assert (tenant.model.name, tenant.lora.r, tenant.lora.alpha, tenant.training.epochs) == ("tenant-7", 4, 32, 3)
    assert tenant.learning.self_anchor.samples == 8 and tenant.learning.self_anchor.magpie is True  # merged
    other = for_line(settings, "anything")
    assert (other.training.epochs, other.lora.r) == (1, 16)
    assert not matches(settings, "../escape") and not matches(settings, "a//b")  # never a storage path
    assert settings.window.max_samples == 100 and settings.model.name == "tiny-llama"  # the top level unchanged


def test_environment_form_is_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [{"name": "a", "window": {"max_samples": 3}}, {"pattern": "t-*", "ewc": {"lambda": 7}}]
    monkeypatch.setenv("STREAMENGINE_MODELS", json.dumps(entries))
    settings = load_settings()
    assert line_names(settings) == ["a"]
    assert for_line(settings, "a").window.max_samples == 3
    assert for_line(settings, "t-1").ewc.lambda_ == 7


def test_lines_remembers_each_name() -> None:
    lines = Lines(load_settings(models=[{"pattern": "t-*"}]))
    assert lines.for_line("t-1") is lines.for_line("t-1")
    assert lines.entry("u") is None and "u" in lines._entries


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a", "window": {"max_samples": 0}}], "models\\[0\\] \\(a\\): window.max_samples: .*greater"),
        ([{"name": "a"}, {"pattern": "b*", "window": {"nope": 1}}], "models\\[1\\] \\(b\\*\\): window.nope: Extra"),
        ([{"pattern": "t-*", "learning": {"replay_fraction": 0.95}}], "models\\[0\\] \\(t-\\*\\): learning: .*below 1"),
        ([{"name": "a"}, {"name": "a"}], "models: line 'a' is listed more than once"),
        ([{"name": "a*"}], "models.0 \\(STREAMENGINE_MODELS\\): .*wildcard: give it as `pattern`"),
        ([{"name": "a", "pattern": "b"}], "either a name or a pattern"),
        ([{"base": "x"}], "either a name or a pattern"),
        ([{"name": "a", "epochs": 3}], "models.0.epochs .*Extra inputs"),
    ],
)
def test_bad_entries_are_named(entries: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(models=entries)


def test_settings_reference_lists_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(LINES_YAML)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    (row,) = [r for r in describe(load_settings()) if r.path == "models"]
    assert (row.env, row.type, row.default) == ("STREAMENGINE_MODELS", "list of mappings (JSON)", "[]")
    assert json.loads(row.value)[0]["window"] == {"max_samples": 5}


def test_settings_show_each_entrys_effective_settings(tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(LINES_YAML)
    rows = {r.path: r.value for r in describe(load_settings(path)) if r.path.startswith("models(")}
    assert rows["models(support).model.base"] == "/models/small"
    assert rows["models(support).window.max_samples"] == "5"
    assert rows["models(search).model.base"] == "/models/shared"  # the base always; nothing else differs
    assert rows["models(tenant-*).lora.r"] == "4" and rows["models(tenant-*).learning.self_anchor.samples"] == "8"
    assert rows["models(*).training.epochs"] == "1"
    assert "models(search).window.max_samples" not in rows and "models(tenant-*).lora.alpha" not in rows
    assert not [r for r in describe() if r.path.startswith("models(")]  # the reference lists no lines
