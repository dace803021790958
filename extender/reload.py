"""The chain rules in force, reloaded when their files change; a bad edit never replaces good rules.

Readers call `current()` once per decision and keep what it gave them: a
reload swaps one reference, so a request in flight finishes on the rules it
started with. Files are watched by polling their status, which follows
symlinks: a mounted ConfigMap is updated by swapping its `..data` symlink,
which changes the resolved path, inode and mtime of every file at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from extender.config import ConfigError, load_rules, load_rules_at_start
from extender.core.rules import ChainRules

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    """What changes when any file is edited or its ConfigMap symlink swapped; a missing file counts as (-1, ...)."""
    marks = []
    for path in paths:
        try:
            status = path.stat()  # follows symlinks
            marks.append((os.path.realpath(path), status.st_ino, status.st_mtime_ns, status.st_size))
        except OSError:
            marks.append((str(path), -1, -1, -1))
    return tuple(marks)


@dataclass(frozen=True)
class ReloadStatus:
    last_good: float  # wall-clock time the rules in force were loaded
    error: str  # why the last edit was rejected; "" when the files on disk are the rules in force
    failures: int  # rejected edits since start


class RulesInForce:
    """One reference to the current ChainRules, swapped whole by `reload`."""

    def __init__(self, rules: ChainRules, paths: Sequence[str | Path] = (), seen: Fingerprint | None = None) -> None:
        """`rules` as loaded from `paths`; `seen`, their fingerprint taken before loading (default: now)."""
        self._rules = rules
        self._paths = [Path(path) for path in paths]
        self._seen = seen if seen is not None else fingerprint(self._paths)
        self._status = ReloadStatus(time.time(), "", 0)
        self._lock = threading.Lock()  # one reload at a time; readers never take it

    @classmethod
    def at_start(cls, program: str, paths: Sequence[str | Path]) -> RulesInForce | None:
        """For a process starting up: the rules in force, or None after printing every problem (exit 2).

        The files are fingerprinted before they are read, so an edit landing
        while they load is a change the first poll picks up, never one missed.
        """
        seen = fingerprint([Path(path) for path in paths])
        rules = load_rules_at_start(program, paths)
        if rules is not None:
            _warn_overlaps(rules)
        return None if rules is None else cls(rules, paths, seen)

    @classmethod
    def fixed(cls, rules: ChainRules) -> RulesInForce:
        """Rules that never change (tests, the simulator, standalone trials)."""
        return cls(rules)

    def current(self) -> ChainRules:
        return self._rules

    def status(self) -> ReloadStatus:
        return self._status

    def describe(self) -> str:
        """For /readyz: ready either way, since the last good rules stay in force."""
        if not self._status.error:
            return ""
        return f"chain rules: the last edit was rejected, the rules loaded at {_clock(self._status.last_good)} " + (
            f"stay in force: {self._status.error}"
        )

    def reload_if_changed(self, settle: float = 0.2) -> bool:
        """Reload when the files changed and have stopped changing; True when new rules were swapped in."""
        now = fingerprint(self._paths)
        if now == self._seen:
            return False
        time.sleep(settle)  # an editor writing in place: wait for the file to stop moving
        if fingerprint(self._paths) != now:
            return False  # still moving: next round
        return self.reload(now)

    def reload(self, seen: Fingerprint) -> bool:
        """Load the files whose fingerprint, taken before reading them, is `seen`; swap them in if they are valid."""
        with self._lock:
            self._seen = seen
            try:
                rules = load_rules(self._paths)  # parsed and validated whole before anything changes
            except ConfigError as error:
                self._status = ReloadStatus(self._status.last_good, str(error), self._status.failures + 1)
                log.error("chain rules edit rejected; the last good rules stay in force:\n%s", error)
                return False
            self._rules = rules
            self._status = ReloadStatus(time.time(), "", self._status.failures)
            log.info("chain rules reloaded: %s", ", ".join(f"{chain.name} ({chain.source})" for chain in rules.chains))
            _warn_overlaps(rules)
            return True

    def watch(self, stop: threading.Event, interval: float = 2.0) -> threading.Thread:
        """Poll the files every `interval` seconds on a daemon thread until `stop` is set."""

        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.reload_if_changed()
                except Exception:  # a reload bug must not end the watch: the rules in force stay
                    log.exception("checking the chain rule files failed")

        thread = threading.Thread(target=run, name="rules-reload", daemon=True)
        thread.start()
        return thread


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _warn_overlaps(rules: ChainRules) -> None:
    """Chains of two files over the same borrows are valid, but each file's policy then limits the other's."""
    for warning in rules.cross_file_overlaps():
        log.warning("chain rules: %s", warning)
