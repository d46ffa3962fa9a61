"""Filter: a bounded, best-effort window of recently published ``sg_event_id``s.

Exactness comes from ClickHouse (ReplacingMergeTree); this only saves the duplicates of a
SendGrid retry from travelling the whole pipeline. Ids are remembered only after the events
were acknowledged downstream (the runtime calls ``written`` after the write's ack):
remembering earlier would turn a failed, retried or redelivered produce into a silently
dropped event. For the same reason the window is forgotten when the runtime sees that the
broker lost data (``forget``): an acknowledgement of a broker that restarted empty is void.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from processors.pipeline import EncodedEvent


class RecentEventIds:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, sg_event_id: object) -> bool:
        return sg_event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def clear(self) -> None:
        self._ids.clear()

    def remember(self, sg_event_ids: Iterable[str]) -> None:
        if self._capacity == 0:
            return
        for sg_event_id in sg_event_ids:
            self._ids[sg_event_id] = None
            self._ids.move_to_end(sg_event_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


class DuplicateEventFilter:
    """The processor's filter step (a runtime ``Filter``): drops events already published,
    or repeated within the batch, by ``sg_event_id``."""

    def __init__(self, capacity: int) -> None:
        self.recent = RecentEventIds(capacity)

    def select(self, outputs: Sequence[EncodedEvent]) -> list[EncodedEvent]:
        selected: list[EncodedEvent] = []
        in_batch: set[str] = set()
        for event in outputs:
            if event.sg_event_id in self.recent or event.sg_event_id in in_batch:
                continue
            in_batch.add(event.sg_event_id)
            selected.append(event)
        return selected

    def written(self, outputs: Sequence[EncodedEvent]) -> None:
        self.recent.remember(event.sg_event_id for event in outputs)

    def forget(self) -> None:
        """The broker lost data: the ids remembered may name events it no longer holds."""
        self.recent.clear()
