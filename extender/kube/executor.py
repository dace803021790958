"""The one executor of borrow plans: creates, deletes and journals pods in an order that never loses one.

Owned pods: create the replacement, then delete the original (its controller
counts the replacement, so it never sees fewer pods than it wants). Bare pods:
journal the original in a ConfigMap, delete it, create the replacement under
the same name, clear the journal. A process killed between any two steps is
finished by `recover()` on the next start.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson

from extender.core.cluster import BORROW_ANNOTATION, REPLACED_UID_ANNOTATION, controller_of
from extender.core.journal import (
    ORIGINAL,
    REPLACEMENT,
    SIGNATURE,
    WRITTEN,
    entry_name,
    entry_signature,
    read_entry,
)
from extender.core.loan import (
    DELETION_COST_ANNOTATION,
    LOWEST_DELETION_COST,
    BorrowPlan,
    put_back,
    recreatable,
    signed_by_migchain,
)
from extender.kube.api import JSON_PATCH, ApiError, KubeApi, path

log = logging.getLogger(__name__)

JOURNAL_LABEL = "migchain.io/journal"
JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
FAILPOINTS_ENV = "MIGCHAIN_FAILPOINTS"
# What `restore` did with a bare borrower that did not go with its eviction.
RESTORE_JOURNALED = "evicted; it is recreated under its name with its original request once it has gone (journaled)"
# On an original recreated because its replacement was refused: the UID it had, so that recovery knows it.
FALLBACK_ANNOTATION = "migchain.io/fallback-of"


class BorrowError(Exception):
    """A borrow that could not be carried out; the pod is left (or put back) as the scheduler can retry it."""


class StillTerminating(BorrowError):
    """A deleted pod is not gone yet (a finalizer, a grace period): when it goes is up to the pod, so nothing
    waits for it; its journal entry stays, and a recovery pass finishes the work once it is gone."""


class CopyRefused(BorrowError):
    """The API server refuses for good to create the pod's copy (a quota, PodSecurity, an admission policy, a
    webhook): found by a dry run before anything was deleted, so the pod stays as it is."""


class FellBack(BorrowError):
    """The copy was refused for good after the pod went (the dry run had passed): the pod was recreated as it
    was before (a borrow's original, a return's borrower)."""


class Abandoned(BorrowError):
    """The pod went before migchain deleted or evicted it (its user deleted it): nothing is recreated."""


class EvictionBlocked(Exception):
    """The Eviction API refused (429): a PodDisruptionBudget allows no disruption now. Retry later, never force."""


def failpoint(name: str) -> None:
    """Die here, as a crash would, when the test harness asks for it (MIGCHAIN_FAILPOINTS=name,...); or stall
    here for SECONDS, as a slow API server would, when it asks for name@SECONDS.

    The whole process group goes, gunicorn's master with its worker, as when
    the container is killed: a lone worker would just be respawned.
    """
    for armed in os.environ.get(FAILPOINTS_ENV, "").split(","):
        point, _, pause = armed.partition("@")
        if point != name:
            continue
        if pause:
            log.warning("failpoint %s: stalling %s s", name, pause)
            time.sleep(float(pause))
            return
        log.warning("failpoint %s: killing the process group", name)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def evicted(pod: Mapping[str, Any]) -> bool:
    """Whether the pod is on its way out by the Eviction API (which marks it so before deleting it), not a delete."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(
        isinstance(condition, Mapping)
        and condition.get("type") == "DisruptionTarget"
        and condition.get("reason") == "EvictionByEvictionAPI"
        for condition in conditions
    )


def pod_path(namespace: str, name: str) -> str:
    return path("api", "v1", "namespaces", namespace, "pods", name)


class Executor:
    def __init__(
        self, api: KubeApi, journal_namespace: str, loan_key: bytes, may_act: Callable[[], bool] = lambda: True
    ) -> None:
        self.api = api
        # The extender's fence (extender.kube.lease.Leadership.acting): a replacement
        # bound to a node takes a slice, so none is created once the lease may have passed.
        self.may_act = may_act
        self.journal_namespace = journal_namespace
        # migchain's key (--loan-key-file): the plans it runs sign their loans with it, and a pod is its own
        # replacement only if that signature verifies (the pod's owner can write any replaced-uid).
        self.loan_key = loan_key
        # UIDs of the bare pods this process is replacing right now: their
        # journal entries are work in progress, not leftovers to finish.
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()

    @contextlib.contextmanager
    def _replacing(self, uid: str) -> Iterator[None]:
        """Hold `uid` while its bare-pod replacement runs, so a recovery pass never finishes it half-way."""
        with self._in_flight_lock:
            if uid in self._in_flight:
                raise BorrowError(f"pod {uid} is being replaced already")
            self._in_flight.add(uid)
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(uid)

    def in_flight(self, uid: str) -> bool:
        with self._in_flight_lock:
            return uid in self._in_flight

    # -- borrow ---------------------------------------------------------------

    def borrow(self, plan: BorrowPlan) -> dict[str, Any]:
        """Carry out the plan; returns the replacement pod as the API server stored it."""
        if plan.keeps_name:
            return self._borrow_bare(plan)
        return self._borrow_owned(plan)

    def _borrow_owned(self, plan: BorrowPlan) -> dict[str, Any]:
        if (controller_of(plan.original["metadata"]) or {}).get("kind") == "ReplicaSet":
            self._cheapest_to_delete(plan)
        failpoint("owned-before-create")
        replacement = self._create_replacement(plan)
        failpoint("owned-after-create")
        self._delete_original(plan)
        return replacement

    def _borrow_bare(self, plan: BorrowPlan) -> dict[str, Any]:
        # Should a step after the journal fail (an API error, the original slow
        # to go), the entry stays and the binder's recovery finishes it.
        with self._replacing(plan.original_uid):
            self._admitted(plan.namespace, plan.replacement, "its replacement")
            self._write_journal(plan)
            failpoint("bare-after-journal")
            if not self._delete_original(plan):
                self._clear_journal(plan.original_uid)
                raise Abandoned(
                    f"pod {plan.namespace}/{plan.original_name} was deleted by someone else before migchain deleted "
                    "it: it is not replaced"
                )
            # An unscheduled pod without finalizers goes with its delete; one that
            # gained a finalizer since it was read does not, and the bind thread
            # must not wait on it: recovery recreates it once it is gone.
            self._check_gone(plan.namespace, plan.original_name, plan.original_uid)
            failpoint("bare-after-delete")
            try:
                replacement = self._create_replacement(plan)
            except ApiError as error:
                if not error.definitive:
                    raise
                raise FellBack(self._fall_back_to_original(plan.original, error)) from error
            failpoint("bare-after-create")
            self._clear_journal(plan.original_uid)
            return replacement

    def _admitted(self, namespace: str, pod: Mapping[str, Any], what: str) -> None:
        """Make sure the API server would create `pod` (a server-side dry run) before anything is deleted.

        Raises CopyRefused on a definitive refusal, ApiError when the answer
        is unknown (nothing is deleted either way). A copy that keeps its
        pod's name is refused only as AlreadyExists by the store, which comes
        after every admission check: that is a yes.
        """
        try:
            self.api.request("POST", path("api", "v1", "namespaces", namespace, "pods"), pod, query={"dryRun": "All"})
        except ApiError as error:
            if error.status == 409 and error.reason == "AlreadyExists":
                return
            if error.definitive:
                name = pod["metadata"].get("name", "")
                raise CopyRefused(
                    f"the API server refuses {what} ({namespace}/{name}), so nothing is deleted: {error}"
                ) from error
            raise

    def _fall_back_to_original(self, original: Mapping[str, Any], refusal: ApiError) -> str:
        """The replacement refused for good, the original gone: recreate the original, pending, as it was.

        It asks not to borrow again (migchain.io/borrow: "false"), or the next
        bind would delete it once more for a copy the API server refuses.
        Raises ApiError, the entry kept, if the original is refused too.
        """
        metadata = original["metadata"]
        namespace = metadata.get("namespace") or "default"
        pod = put_back(original, self.loan_key)  # a restore record: the admission policy admits it
        # Not signed: the restore record's signature covers migchain's own annotations, not these two.
        pod["metadata"]["annotations"] |= {BORROW_ANNOTATION: "false", FALLBACK_ANNOTATION: metadata["uid"]}
        outcome = self._recreate(
            namespace,
            pod,
            f"fell back: its replacement was refused ({refusal}); recreated the original, pending, not to borrow again",
        )
        self._clear_journal(metadata["uid"])
        return outcome

    def _cheapest_to_delete(self, plan: BorrowPlan) -> None:
        """Mark the original as the pod its ReplicaSet should drop first.

        Seeing the replacement, the ReplicaSet has one pod too many and deletes
        one of its unscheduled pods; with the lowest deletion cost that is the
        original, not a sibling it would then have to create again.
        """
        with contextlib.suppress(ApiError):
            self.api.patch(
                pod_path(plan.namespace, plan.original_name),
                [
                    {"op": "test", "path": "/metadata/uid", "value": plan.original_uid},
                    {
                        "op": "add",
                        "path": "/metadata/annotations",
                        "value": {
                            **(plan.original["metadata"].get("annotations") or {}),
                            DELETION_COST_ANNOTATION: str(LOWEST_DELETION_COST),
                        },
                    },
                ],
                content_type=JSON_PATCH,
            )

    def _create_replacement(self, plan: BorrowPlan) -> dict[str, Any]:
        if not self.may_act():
            raise BorrowError("this replica no longer leads: the replacement is left to the leader (journal)")
        try:
            return self.api.create(path("api", "v1", "namespaces", plan.namespace, "pods"), plan.replacement)
        except ApiError as error:
            if error.status != 409:
                raise
        # It exists: ours from an earlier try, or somebody else's pod of that name.
        existing = self.api.get(pod_path(plan.namespace, plan.replacement_name))
        if not self._replaces(existing, plan.original_uid):
            raise BorrowError(f"a pod named {plan.namespace}/{plan.replacement_name} already exists and is not ours")
        return existing

    def _replaces(self, pod: Mapping[str, Any], uid: str) -> bool:
        """Whether `pod` is the replacement migchain made of pod `uid`: it says so in a loan migchain signed."""
        annotations = pod["metadata"].get("annotations") or {}
        return annotations.get(REPLACED_UID_ANNOTATION) == uid and signed_by_migchain(pod, self.loan_key)

    def _delete_original(self, plan: BorrowPlan) -> bool:
        """Delete the original; False when it was gone (or replaced by another pod of its name) already."""
        resource = pod_path(plan.namespace, plan.original_name)
        finalizers = plan.original["metadata"].get("finalizers") or []
        if JOB_TRACKING_FINALIZER in finalizers:
            # The Job controller counts a deleted, unfinished pod that still has its
            # tracking finalizer as a failure; it removes the finalizer itself before
            # deleting surplus pods, and so do we: the replacement carries the count.
            index = finalizers.index(JOB_TRACKING_FINALIZER)
            with contextlib.suppress(ApiError):
                self.api.patch(
                    resource,
                    [
                        {"op": "test", "path": "/metadata/uid", "value": plan.original_uid},
                        {"op": "test", "path": f"/metadata/finalizers/{index}", "value": JOB_TRACKING_FINALIZER},
                        {"op": "remove", "path": f"/metadata/finalizers/{index}"},
                    ],
                    content_type=JSON_PATCH,
                )
        try:
            self.api.delete(
                resource,
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,  # it never ran: nothing to shut down
                    "preconditions": {"uid": plan.original_uid},
                },
            )
        except ApiError as error:
            if error.status not in (404, 409):  # gone already, or replaced by another pod of that name
                raise
            return False
        return True

    def _check_gone(self, namespace: str, name: str, uid: str) -> None:
        """Return if pod `uid` is gone (or replaced under its name); raise StillTerminating if not. Never waits:
        how long a deleted pod takes to go is up to its finalizers and its grace period."""
        current = self._current(namespace, name)
        if current is not None and current["metadata"].get("uid") == uid:
            held = "held by finalizers" if current["metadata"].get("finalizers") else "in its grace period"
            raise StillTerminating(
                f"pod {namespace}/{name} is still terminating ({held}); it stays journaled and is recreated once "
                "it is gone"
            )

    # -- return ---------------------------------------------------------------

    def evict(
        self, pod: Mapping[str, Any], *, dry_run: bool = False, unchanged: bool = False, gone_ok: bool = True
    ) -> None:
        """Evict through the Eviction API, so PodDisruptionBudgets hold; raise EvictionBlocked on 429.

        With `dry_run` the API server only says whether it would (a PDB is
        asked, nothing is deleted). With `unchanged` it evicts the pod only as
        it is in `pod` (its resourceVersion), and a pod changed since is an
        ApiError 409, not taken for one gone. Without `gone_ok` a pod gone
        already (404, or another pod of its name: 409) is an ApiError too.
        """
        metadata = pod["metadata"]
        namespace = metadata.get("namespace") or "default"
        preconditions = {"uid": metadata["uid"]}
        if unchanged:
            preconditions["resourceVersion"] = metadata["resourceVersion"]
        options: dict[str, Any] = {"preconditions": preconditions}
        if dry_run:
            options["dryRun"] = ["All"]
        try:
            self.api.create(
                pod_path(namespace, metadata["name"]) + "/eviction",
                {
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": metadata["name"], "namespace": namespace},
                    "deleteOptions": options,
                },
            )
        except ApiError as error:
            if error.status == 429:
                raise EvictionBlocked(error.message) from None
            if (error.status == 409 and unchanged) or not gone_ok:
                raise
            if error.status not in (404, 409):  # gone already
                raise

    def nominate(self, pod: Mapping[str, Any], node: str) -> None:
        """Set the pod's status.nominatedNodeName, as kube-scheduler does for the pod it preempted for.

        kube-scheduler then tries that node first, and the extender keeps the
        slices the pod fits there for it against pods of lower priority. The
        UID test keeps a pod recreated under the name from being nominated.
        """
        metadata = pod["metadata"]
        self.api.patch(
            pod_path(metadata.get("namespace") or "default", metadata["name"]) + "/status",
            [
                {"op": "test", "path": "/metadata/uid", "value": metadata["uid"]},
                {"op": "add", "path": "/status/nominatedNodeName", "value": node},
            ],
            content_type=JSON_PATCH,
        )

    def restore(self, borrower: Mapping[str, Any], restored: Mapping[str, Any], owned: bool) -> str:
        """Move a borrower back to its original request; returns what was done, for the log and the event.

        Owned pods are evicted and their controller recreates them from its
        template, which asks for the original request. Bare pods are journaled,
        evicted, and recreated under their name with their original request:
        at once if the eviction took them at once, else by `finish_return` once
        they are gone (a grace period, a finalizer: the pod's to decide, so no
        round waits for it).
        """
        if owned:
            if JOB_TRACKING_FINALIZER in (borrower["metadata"].get("finalizers") or []):
                self._evict_job_pod(borrower)
                return "evicted, not counted as a failure; its Job recreates it with its original request"
            self.evict(borrower)
            return "evicted; its controller recreates it with its original request"
        metadata = borrower["metadata"]
        namespace, uid = metadata.get("namespace") or "default", metadata["uid"]
        self._admitted(namespace, restored, "its restored pod")
        self._journal_entry("return", uid, borrower, restored)
        try:
            self.evict(borrower, gone_ok=False)
        except EvictionBlocked:
            self._clear_journal(uid)
            raise
        except ApiError as error:
            if error.status in (404, 409):
                self._clear_journal(uid)
                raise Abandoned(
                    f"pod {namespace}/{metadata['name']} was gone before its eviction: not recreated"
                ) from None
            if error.definitive:  # not evicted (its namespace going, say): nothing to finish later
                self._clear_journal(uid)
            # Otherwise no answer, or a server error: it may have been evicted. The entry stays and the
            # journal's recovery finishes the return, or clears it if the borrower is still there.
            raise
        failpoint("return-after-evict")
        try:
            self._check_gone(namespace, metadata["name"], uid)
        except StillTerminating:
            return RESTORE_JOURNALED
        outcome = self._recreate_restored(borrower, restored)
        self._clear_journal(uid)
        return outcome

    def _recreate_restored(self, borrower: Mapping[str, Any], restored: Mapping[str, Any]) -> str:
        """Create the restored pod of an evicted borrower; refused for good, the borrower as it was instead.

        The borrower comes back unbound (its slice may be someone else's by
        now), asking for what it borrowed, its loan record kept: the scheduler
        places it again. Raises ApiError, the entry kept, if that is refused too.
        """
        namespace = borrower["metadata"].get("namespace") or "default"
        try:
            return self._recreate(namespace, restored, "evicted and recreated under its name with its original request")
        except ApiError as error:
            if not error.definitive:
                raise
            refusal = error
        pod = recreatable(borrower)
        pod["spec"].pop("nodeName", None)
        outcome = self._recreate(
            namespace,
            pod,
            f"fell back: its restored pod was refused ({refusal}); recreated the borrower as it was, pending",
        )
        self._clear_journal(borrower["metadata"]["uid"])
        raise FellBack(outcome)

    def _evict_job_pod(self, pod: Mapping[str, Any]) -> None:
        """Evict a Job's pod without the Job counting it as a failure.

        The Job controller counts a deleted pod that did not succeed as failed
        while it still has the tracking finalizer (one without it was counted
        already); it removes the finalizer itself before deleting pods it has
        too many of, and so does this. A PDB is asked first (a dry-run
        eviction), so a return it refuses leaves the pod untouched; and should
        the eviction still not happen, the finalizer goes back: without it the
        Job would never count the pod's success. For that reason too the pod is
        evicted only as it was when its finalizer went: a pod that has ended
        meanwhile is left for the Job to count.
        """
        try:
            self.evict(pod, dry_run=True)  # EvictionBlocked goes to the caller: nothing was touched
        except ApiError as error:
            # A webhook that cannot dry-run, say: the eviction itself will tell.
            log.info("dry-run eviction of %s failed (%s); evicting", pod["metadata"]["name"], error)
        try:
            untracked = self._patch_finalizers(pod, remove=True)
            self.evict(untracked, unchanged=True)
        except Exception:
            self._track_again(pod)
            raise

    def _patch_finalizers(self, pod: Mapping[str, Any], *, remove: bool) -> dict[str, Any]:
        """Remove the Job tracking finalizer from `pod`, or add it back; returns the pod as patched.

        The removal tests the element it removes and that the pod is in the
        phase it was read in (a pod that has just ended keeps its finalizer,
        so the Job counts it), not its resourceVersion: a kubelet's other
        status updates must not make it fail. Adding it back writes the whole
        list as read, so it also tests that nothing changed since.
        """
        metadata = pod["metadata"]
        finalizers = list(metadata.get("finalizers") or [])
        patch: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/uid", "value": metadata["uid"]}]
        if remove:
            index = finalizers.index(JOB_TRACKING_FINALIZER)
            patch += [
                {"op": "test", "path": "/status/phase", "value": (pod.get("status") or {}).get("phase")},
                {"op": "test", "path": f"/metadata/finalizers/{index}", "value": JOB_TRACKING_FINALIZER},
                {"op": "remove", "path": f"/metadata/finalizers/{index}"},
            ]
        else:
            patch += [
                {"op": "test", "path": "/metadata/resourceVersion", "value": metadata.get("resourceVersion")},
                {"op": "add", "path": "/metadata/finalizers", "value": [*finalizers, JOB_TRACKING_FINALIZER]},
            ]
        return self.api.patch(
            pod_path(metadata.get("namespace") or "default", metadata["name"]), patch, content_type=JSON_PATCH
        )

    def _track_again(self, pod: Mapping[str, Any], attempts: int = 3) -> None:
        """Put the Job tracking finalizer back on a pod that was not evicted after all (best effort, logged)."""
        metadata = pod["metadata"]
        namespace, name, uid = metadata.get("namespace") or "default", metadata["name"], metadata["uid"]
        for _ in range(attempts):
            try:
                current = self._current(namespace, name)
                if (
                    current is None
                    or current["metadata"].get("uid") != uid
                    or current["metadata"].get("deletionTimestamp")  # evicted after all: no finalizer may be added
                    or JOB_TRACKING_FINALIZER in (current["metadata"].get("finalizers") or [])
                ):
                    return
                self._patch_finalizers(current, remove=False)
                return
            except ApiError as error:
                log.warning("putting the Job tracking finalizer back on %s/%s failed: %s", namespace, name, error)
        log.error("pod %s/%s has lost its Job tracking finalizer: its Job will not count how it ends", namespace, name)

    def _recreate(self, namespace: str, pod: Mapping[str, Any], done: str) -> str:
        """Create a journaled pod; a namespace being deleted takes its pods with it, so that is done too."""
        try:
            self.api.create(path("api", "v1", "namespaces", namespace, "pods"), pod)
        except ApiError as error:
            if error.status == 409:
                return "it was already recreated"
            if not error.namespace_gone:
                raise
            return f"not recreated: its namespace {namespace} is being deleted"
        return done

    def finish_return(self, borrower: Mapping[str, Any], restored: Mapping[str, Any]) -> str:
        """Finish one journaled return (after a crash, or an evicted borrower slow to go); returns what was done,
        for the log. Raises StillTerminating, the entry kept, while the borrower is on its way out."""
        metadata = borrower["metadata"]
        namespace, name, uid = metadata.get("namespace") or "default", metadata["name"], metadata["uid"]
        current = self._current(namespace, name)
        if current is not None and current["metadata"].get("uid") == uid:
            if not current["metadata"].get("deletionTimestamp"):
                self._clear_journal(uid)
                return "the eviction never happened; the borrower keeps running"
            if not evicted(current):
                # Deleted, not evicted: migchain returns only by eviction, so its user deleted it.
                self._clear_journal(uid)
                return "it was deleted by someone else, not evicted: not recreated"
            self._check_gone(namespace, name, uid)
            current = None
        if current is None:
            try:
                outcome = self._recreate_restored(borrower, restored)
            except FellBack as fell_back:
                outcome = str(fell_back)
        else:
            outcome = "it was already recreated"
        self._clear_journal(uid)
        return outcome

    # -- journal --------------------------------------------------------------

    def _current(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod of that name now, or None when there is none."""
        try:
            return self.api.get(pod_path(namespace, name))
        except ApiError as error:
            if error.status != 404:
                raise
            return None

    def _journal_name(self, uid: str) -> str:
        return entry_name(uid)

    def _write_journal(self, plan: BorrowPlan) -> None:
        self._journal_entry("borrow", plan.original_uid, plan.original, plan.replacement)

    def _journal_entry(self, kind: str, uid: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
        name = self._journal_name(uid)
        data = {
            ORIGINAL: orjson.dumps(before).decode(),
            REPLACEMENT: orjson.dumps(after).decode(),
            WRITTEN: datetime.datetime.now(datetime.UTC).isoformat(),
        }
        # Anyone who may create a ConfigMap here could write an entry: only a signed one is believed.
        data[SIGNATURE] = entry_signature(self.loan_key, name, kind, data)
        self.api.create(
            path("api", "v1", "namespaces", self.journal_namespace, "configmaps"),
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "labels": {JOURNAL_LABEL: kind, "app.kubernetes.io/managed-by": "migchain"},
                },
                "data": data,
            },
        )

    def _clear_journal(self, uid: str) -> None:
        with contextlib.suppress(ApiError):
            self.api.delete(
                path("api", "v1", "namespaces", self.journal_namespace, "configmaps", self._journal_name(uid))
            )

    def journal(
        self, kind: str = "borrow", rejected: Callable[[Mapping[str, Any], str], None] | None = None
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Unfinished bare-pod replacements of one kind (borrow, return): (before, after) pairs.

        Only entries migchain signed, each about one pod (core/journal.py
        read_entry), are returned; any other is never acted on, but left for an
        admin and passed to `rejected` (the ConfigMap, why) to be reported.
        """
        items, _ = self.api.list_all(
            path("api", "v1", "namespaces", self.journal_namespace, "configmaps"),
            labelSelector=f"{JOURNAL_LABEL}={kind}",
        )
        entries = []
        for item in items:
            read = read_entry(self.loan_key, str(item["metadata"]["name"]), kind, item.get("data") or {})
            if isinstance(read, str):
                log.error(
                    "journal entry %s is not believed: %s; it is left for an admin", item["metadata"]["name"], read
                )
                if rejected is not None:
                    rejected(item, read)
                continue
            entries.append(read)
        return entries

    def journal_ages(self, kind: str) -> list[tuple[dict[str, Any], float]]:
        """Each believed entry of one kind (see `journal`): a reference to its pod (namespace, name, UID), and
        its age in seconds.

        The age is the ConfigMap's, as the API server stamped it; the pod is
        read from the entry and only named, never acted on.
        """
        items, _ = self.api.list_all(
            path("api", "v1", "namespaces", self.journal_namespace, "configmaps"),
            labelSelector=f"{JOURNAL_LABEL}={kind}",
        )
        now = datetime.datetime.now(datetime.UTC)
        ages = []
        for item in items:
            read = read_entry(self.loan_key, str(item["metadata"]["name"]), kind, item.get("data") or {})
            if isinstance(read, str):
                continue  # not believed: journal() reports it, and no Event names a pod it made up
            metadata = read[0]["metadata"]
            reference = {
                "metadata": {
                    "namespace": str(metadata.get("namespace") or "default"),
                    "name": str(metadata["name"]),
                    "uid": str(metadata["uid"]),
                }
            }
            try:
                created = datetime.datetime.fromisoformat(item["metadata"]["creationTimestamp"])
            except (KeyError, TypeError, ValueError):
                continue
            ages.append((reference, max(0.0, (now - created).total_seconds())))
        return ages

    def finish(
        self, original: Mapping[str, Any], replacement: Mapping[str, Any], replacement_fits: Callable[[], bool]
    ) -> str:
        """Finish one journaled borrow (after a crash, or a step that failed); returns what was done, for the log.

        Raises StillTerminating, the entry kept, while the original is still on
        its way out: recovery tries again later, and never waits for it here.
        """
        metadata = original["metadata"]
        namespace, name, uid = metadata.get("namespace") or "default", metadata["name"], metadata["uid"]
        with self._replacing(uid):
            current = self._current(namespace, name)
            if current is not None and current["metadata"].get("uid") == uid:
                if not current["metadata"].get("deletionTimestamp"):
                    self._clear_journal(uid)
                    return "the original was never deleted; it stays pending"
                # Deleted but not gone (a finalizer, a slow API server): it will
                # be gone, so it is recreated once it is, never left for lost.
                self._check_gone(namespace, name, uid)
                current = None
            if current is not None:
                if self._replaces(current, uid):
                    outcome = "the replacement was already created"
                elif (current["metadata"].get("annotations") or {}).get(FALLBACK_ANNOTATION) == uid:
                    outcome = "fell back: the original was already recreated"
                else:
                    log.error("pod %s/%s was recreated by someone else; journal kept for an admin", namespace, name)
                    return "kept: the name is taken by another pod"
            elif not self.may_act():
                raise BorrowError("this replica no longer leads: the journal entry is left to the leader")
            elif replacement_fits():
                try:
                    outcome = self._recreate(namespace, replacement, "recreated the replacement on its node")
                except ApiError as error:
                    if not error.definitive:
                        raise
                    return self._fall_back_to_original(original, error)
            else:
                outcome = self._recreate(
                    namespace,
                    put_back(original, self.loan_key),
                    "its node is full now: recreated the original, pending",
                )
            self._clear_journal(uid)
            return outcome
