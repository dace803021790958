"""Journal entries left unfinished too long: one Event on each one's pod, in its namespace, and gauges to alert on.

An entry is finished within seconds, or falls back to the pod as it was; one
still there after `after` seconds is a pod that may exist only in the journal
(both its copy and the pod as it was refused, the API server away): a person
must look. Nothing here acts on the entry.
"""

from __future__ import annotations

import logging

from extender.kube.events import EventRecorder
from extender.kube.executor import Executor
from extender.kube.once import Once
from extender.metrics import JournalGauges

log = logging.getLogger(__name__)

OVERDUE_AFTER_SECONDS = 180.0


class OverdueJournal:
    def __init__(
        self,
        executor: Executor,
        events: EventRecorder,
        gauges: JournalGauges,
        kind: str,
        after: float = OVERDUE_AFTER_SECONDS,
    ) -> None:
        self.executor = executor
        self.events = events
        self.gauges = gauges
        self.kind = kind  # borrow, return
        self.after = after
        self._reported = Once[str]()  # UIDs of the pods whose overdue entry has had its Event
        gauges.set(kind, 0, 0.0)

    def check(self, clean: bool) -> None:
        """After a recovery pass: a clean journal zeroes the gauges; else every entry's age is read again."""
        if clean:
            self.gauges.set(self.kind, 0, 0.0)
            self._reported.keep_only(())
            return
        entries = self.executor.journal_ages(self.kind)
        overdue = [(pod, age) for pod, age in entries if age >= self.after]
        self.gauges.set(self.kind, len(overdue), max((age for _, age in entries), default=0.0))
        for pod, age in overdue:
            metadata = pod["metadata"]
            if not self._reported.first(metadata["uid"]):
                continue
            message = (
                f"migchain's journal has held this pod's {self.kind} unfinished for {age:.0f}s: the pod may exist "
                "only in the journal (ConfigMap migchain-journal-"
                f"{metadata['uid']}); migchain keeps retrying, see its log for why it cannot finish"
            )
            log.error("%s/%s: %s", metadata.get("namespace"), metadata.get("name"), message)
            self.events.record(pod, "JournalOverdue", message, "Warning")
        self._reported.keep_only({pod["metadata"]["uid"] for pod, _ in entries})
