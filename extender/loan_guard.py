"""The check of every pod's loan record as the cluster cache reads it; no I/O.

A record migchain did not sign (core/loan.py `vouched`) is dropped, so the
pod is an ordinary pod holding what it asks for; it is counted once, and
queued once for the returner to report with an Event. Called under the
cache's lock; the queue is bounded, so a flood of forged pods costs a
counter, never memory.
"""

from __future__ import annotations

import collections
from collections.abc import Collection
from dataclasses import dataclass

from extender.core.cluster import PodRecord
from extender.core.loan import loan_doubt, vouched
from extender.metrics import UnreadableLoans

MAX_QUEUED_REPORTS = 256


@dataclass(frozen=True)
class RejectedLoan:
    namespace: str
    name: str
    uid: str
    reason: str  # core/loan.py FORGED, UNSIGNED or UNREADABLE
    message: str  # core/loan.py loan_doubt: what is wrong, for the pod's owner


class LoanGuard:
    """Vouches for each pod record the cache keeps (with migchain's key; None: records as written)."""

    def __init__(self, key: bytes | None, counter: UnreadableLoans | None = None, *, reports: bool = False) -> None:
        self.key = key
        self.counter = counter if counter is not None else UnreadableLoans()
        self.reports = reports  # the returner reports rejected loans with Events; the extender only counts
        self._rejected: dict[str, str] = {}  # pod uid -> why its loan was not believed, for pods in the cache
        self._queue: collections.deque[RejectedLoan] = collections.deque(maxlen=MAX_QUEUED_REPORTS)

    def vouch(self, record: PodRecord) -> PodRecord:
        believed, reason = vouched(record, self.key)
        uid = record.request.uid
        if not reason:
            self._rejected.pop(uid, None)
        elif self._rejected.get(uid) != reason:
            # Once per pod (and reason), however often it changes: a counter, not a log of every update.
            self._rejected[uid] = reason
            self.counter.count(reason)
            if self.reports:
                request = record.request
                message = loan_doubt(record, reason)
                self._queue.append(RejectedLoan(request.namespace, request.name, uid, reason, message))
        return believed

    def forget(self, uid: str) -> None:
        self._rejected.pop(uid, None)

    def keep_only(self, uids: Collection[str]) -> None:
        """After a relist: forget the pods that are gone."""
        self._rejected = {uid: reason for uid, reason in self._rejected.items() if uid in uids}

    def take_reports(self, limit: int) -> list[RejectedLoan]:
        """Up to `limit` rejected loans not reported yet, oldest first (thread-safe: deque pops are atomic)."""
        taken: list[RejectedLoan] = []
        while self._queue and len(taken) < limit:
            try:
                taken.append(self._queue.popleft())
            except IndexError:
                break
        return taken
