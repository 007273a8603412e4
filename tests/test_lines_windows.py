"""The batch write of several model lines at once (``store.windows``): lines whose windows stay open share one COPY
and one update, lines whose window the batch may close are cut sample by sample, and each window's offsets are the
least first and the greatest last offset of each partition, whatever order the records come in."""

from __future__ import annotations

import pytest

from streamengine.config.settings import DatabaseSettings
from streamengine.contract.events import FeedbackEvent
from streamengine.core.samples import SamplePolicy, to_sample
from streamengine.core.windows import WindowPolicy
from streamengine.store import windows
from streamengine.store.db import Database
from streamengine.store.windows import SampleAt

pytestmark = pytest.mark.integration

POLICIES = {
    "heavy": WindowPolicy(max_samples=1000, max_weight=2.5),  # closes on its third sample of weight 1
    "light": WindowPolicy(max_samples=1000),
    "other": WindowPolicy(max_samples=1000),
}


def row(event_id: str, model: str, partition: int, offset: int, kind: str = "thumbs_up") -> SampleAt:
    event = FeedbackEvent(event_id=event_id, model=model, prompt="q", response="a", kind=kind)
    return to_sample(event, SamplePolicy(kind_weights={"thumbs_up": 1.0, "thumbs_down": 1.0})), partition, offset


async def test_lines_sharing_a_batch_close_at_their_own_threshold_and_keep_exact_offsets(pg_dsn: str) -> None:
    db = await Database.connect(DatabaseSettings(url=pg_dsn))
    try:
        first = await windows.write_batch(
            db,
            [
                row("h1", "heavy", 0, 10),
                row("l1", "light", 0, 11),
                row("o1", "other", 1, 7),
                row("h2", "heavy", 1, 5),
                row("l2", "light", 1, 6),
                row("n1", "light", 0, 12, "thumbs_down"),
            ],
            POLICIES.__getitem__,
        )
        assert first.closed == [] and first.inserted_by_model == {"heavy": 2, "light": 3, "other": 1}
        assert first.open_samples == {"heavy": 2, "light": 2, "other": 1}  # the thumbs down is stored, not trainable
        second = await windows.write_batch(
            db,
            [
                row("l3", "light", 0, 3),
                row("h3", "heavy", 0, 20),
                row("h4", "heavy", 0, 21),
                row("o2", "other", 1, 2),
                row("l4", "light", 2, 30),
            ],
            POLICIES.__getitem__,
            look_first=False,
        )
        rows = await db.fetch(
            "SELECT model, state, samples, stored, first_offsets, last_offsets FROM windows ORDER BY model, id"
        )
        placed = await db.fetch(
            "SELECT s.event_id, w.model, w.state FROM samples s JOIN windows w ON w.id = s.window_id ORDER BY 1"
        )
    finally:
        await db.close()
    assert [(c.model, c.samples, c.weight) for c in second.closed] == [("heavy", 3, 3.0)]
    assert second.open_samples == {"heavy": 1, "light": 4, "other": 2}
    found = {(r["model"], r["state"]): (r["samples"], r["stored"], r["first_offsets"], r["last_offsets"]) for r in rows}
    # heavy: h1, h2, h3 close the first window at weight 3 >= 2.5; h4 opens the next
    assert found["heavy", "closed"] == (3, 3, {"0": 10, "1": 5}, {"0": 20, "1": 5})
    assert found["heavy", "open"] == (1, 1, {"0": 21}, {"0": 21})
    # light and other: a record older than the window's first (offset 3 < 11, 2 < 7) moves its first offset back
    # and leaves the last one
    assert found["light", "open"] == (4, 5, {"0": 3, "1": 6, "2": 30}, {"0": 12, "1": 6, "2": 30})
    assert found["other", "open"] == (2, 2, {"1": 2}, {"1": 7})
    assert {r["event_id"]: (r["model"], r["state"]) for r in placed}["h4"] == ("heavy", "open")
    assert sum(1 for r in placed if (r["model"], r["state"]) == ("heavy", "closed")) == 3
