"""Bookkeeping of connections that have not yet sent a whole request (a deadline each, caps), and who a peer is.

No I/O: the servers (extender.worker, extender.probes) close what it hands back.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

Item = TypeVar("Item", bound=Hashable)


class Arrivals(Generic[Item]):
    """Connections on a deadline, oldest first; at most `capacity` in all and `per_peer` from one client address.

    A newcomer past a cap pushes out the oldest (of its own address first),
    rather than being turned away: a stalled client has had its chance,
    while a real one (kube-scheduler, kubelet) completes its handshake and
    request head in milliseconds and so is never the oldest for long. One
    address can therefore never push out another's connections, and a flood
    of many can only shorten everyone's wait, never stop the server accepting.
    """

    def __init__(self, capacity: int, per_peer: int) -> None:
        if not 0 < per_peer <= capacity:
            raise ValueError(f"need 0 < per_peer ({per_peer}) <= capacity ({capacity})")
        self._capacity = capacity
        self._per_peer = per_peer
        # Both in arrival order, which is deadline order: every deadline is "now + the same timeout".
        self._all: dict[Item, tuple[str, float]] = {}
        self._by_peer: dict[str, dict[Item, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, item: object) -> bool:
        return item in self._all

    def add(self, item: Item, peer: str, deadline: float) -> list[Item]:
        """Track `item` until `deadline`; return the items pushed out to make room (to be closed), oldest first."""
        pushed: list[Item] = []
        same_peer = self._by_peer.get(peer, {})
        if len(same_peer) >= self._per_peer:
            pushed.append(next(iter(same_peer)))
            self.remove(pushed[-1])
        if len(self._all) >= self._capacity:
            pushed.append(next(iter(self._all)))
            self.remove(pushed[-1])
        self._all[item] = (peer, deadline)
        self._by_peer.setdefault(peer, {})[item] = None
        return pushed

    def remove(self, item: Item) -> None:
        """Forget `item` (it was served, or closed); nothing if it is not tracked."""
        entry = self._all.pop(item, None)
        if entry is None:
            return
        same_peer = self._by_peer[entry[0]]
        del same_peer[item]
        if not same_peer:
            del self._by_peer[entry[0]]

    def expired(self, now: float) -> list[Item]:
        """Forget and return the items whose deadline has passed."""
        gone: list[Item] = []
        for item, (_, deadline) in self._all.items():
            if deadline > now:
                break
            gone.append(item)
        for item in gone:
            self.remove(item)
        return gone


def certificate_names(certificate: dict[str, object]) -> frozenset[str]:
    """The common names and the DNS and URI alternative names of a certificate, as `getpeercert()` gives it."""
    subject = certificate.get("subject")
    alternatives = certificate.get("subjectAltName")
    names = {
        value
        for entry in (subject if isinstance(subject, tuple) else ())
        for key, value in entry
        if key == "commonName"
    }
    names.update(
        value for kind, value in (alternatives if isinstance(alternatives, tuple) else ()) if kind in ("DNS", "URI")
    )
    return frozenset(names)


def shown_names(names: frozenset[str]) -> str:
    """Names from a certificate, for a log line or an error: escaped, and cut short."""
    return ", ".join(sorted(names))[:200].encode("unicode_escape").decode("ascii") or "no name"
