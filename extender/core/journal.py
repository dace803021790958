"""Journal entries of bare-pod borrows and returns: signed by migchain, read back only if they name one pod; pure.

An entry is a ConfigMap in migchain's namespace holding a pod before and
after (the original and its replacement, or a borrower and the pod it is
restored as). Whoever may create a ConfigMap there could otherwise have
migchain create any pod in any namespace, so each entry carries an HMAC, under
the loan key, of everything it says (`entry_signature`), and `read_entry`
believes an entry only when the HMAC verifies and both pods are the one pod
the entry is named after: its UID in the entry's name, one namespace, one
name, a replacement migchain signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from extender.core.cluster import REPLACED_UID_ANNOTATION
from extender.core.loan import signed_by_migchain

ENTRY_PREFIX = "migchain-journal-"
BORROW = "borrow"  # a bare pod's borrow: the original, and its replacement bound to the node
RETURN = "return"  # a bare borrower's return: the borrower, and the pod restored to its original request
# The fields of an entry's data (ConfigMap data, all strings).
ORIGINAL, REPLACEMENT, WRITTEN, SIGNATURE = "original", "replacement", "written", "signature"

Pod = dict[str, Any]


def entry_name(uid: str) -> str:
    """The entry of the pod with this UID: one per pod, so a retried write finds the one it made."""
    return f"{ENTRY_PREFIX}{uid}"


def entry_signature(key: bytes, name: str, kind: str, data: Mapping[str, Any]) -> str:
    """migchain's HMAC-SHA256, under `key`, of an entry's name, kind and data as stored (the JSON texts)."""
    fields = ["migchain-journal/v1", name, kind, *(data.get(field) for field in (ORIGINAL, REPLACEMENT, WRITTEN))]
    message = json.dumps(fields, separators=(",", ":"))
    return "v1:" + hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def read_entry(key: bytes, name: str, kind: str, data: Mapping[str, Any]) -> tuple[Pod, Pod] | str:
    """The (before, after) pods of the entry `name` of `kind`, or why it is not believed.

    `data` is whatever the ConfigMap holds: anything that can create a
    ConfigMap in migchain's namespace may have written it.
    """
    texts = [data.get(field) for field in (ORIGINAL, REPLACEMENT, WRITTEN, SIGNATURE)]
    if not all(isinstance(text, str) for text in texts):
        return f"it lacks one of {ORIGINAL}, {REPLACEMENT}, {WRITTEN}, {SIGNATURE}"
    expected = entry_signature(key, name, kind, data)
    if not hmac.compare_digest(str(data[SIGNATURE]).encode(), expected.encode()):
        return "its signature does not match (not written by migchain, or edited since)"
    try:
        before, after = json.loads(data[ORIGINAL]), json.loads(data[REPLACEMENT])
        return _one_pod(key, name, kind, before, after) or (before, after)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        return f"its pods cannot be read back ({type(error).__name__})"


def _one_pod(key: bytes, name: str, kind: str, before: Any, after: Any) -> str:
    """Why `before` and `after` are not the one pod entry `name` is about ("" when they are)."""
    uid = before["metadata"]["uid"]
    if not isinstance(uid, str) or entry_name(uid) != name:
        return "it is not named after the UID of the pod it holds"
    for field in ("namespace", "name"):
        if (before["metadata"].get(field) or "default") != (after["metadata"].get(field) or "default"):
            return f"its two pods differ in {field}"
    if kind == BORROW:
        replaced = (after["metadata"].get("annotations") or {}).get(REPLACED_UID_ANNOTATION)
        if replaced != uid or not signed_by_migchain(after, key):
            return "its replacement is not a loan migchain signed for this pod"
    elif kind == RETURN:
        if not signed_by_migchain(before, key) or not signed_by_migchain(after, key):
            return "its borrower or restored pod is not one migchain signed"
    else:
        return f"its kind {kind!r} is neither {BORROW} nor {RETURN}"
    return ""
