"""The one reader of text a pod's owner writes (annotations, names): bounded, checked, escaped when shown; pure.

A pod's owner can write any annotation, on a running pod too, including the
loan record migchain put there. Everything read from one goes through here:
counts are ASCII digits under a cap, names match a short pattern, JSON is
size-capped, and text shown to a human or put in an answer is an escaped
excerpt. A reader returns None (or raises ValueError) for what it cannot
read; the caller skips that pod, never the round or the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# A node holds at most 16 GPUs of 7 MIG slices each, 112 slices: no pod can
# hold, or have asked for, more slices of one type than this.
MAX_SLICES = 128
# No GPU model has more than a dozen MIG profiles, so no chain moves a slice
# this many places up; a loan's steps are at most slices times this.
MAX_STEPS_PER_SLICE = 64
# How often one pod may have been returned, or may be capped at: far more
# than any pod is ever restarted for a slice.
MAX_RESTARTS = 1024
# MIG types one loan record names (a real pod asks for one or two).
MAX_TYPES = 16
# Chain names one loan record names (a real loan is made along one or two).
MAX_CHAINS = 16
# Characters of pod-written text shown in a reason, an event, a log line or `migchain explain`.
EXCERPT_CHARS = 40

# A chain name as the rules loader accepts it (a DNS label).
CHAIN_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# A MIG extended resource name as the API server accepts one (a qualified name under nvidia.com).
MIG_RESOURCE = re.compile(r"nvidia\.com/mig-[A-Za-z0-9]([-A-Za-z0-9_.]{0,57}[A-Za-z0-9])?")
# A pod UID: what the API server writes is a UUID; anything of this shape is readable.
UID = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,127}")


def count(text: str | None, limit: int) -> int | None:
    """A whole number written as ASCII digits (surrounding spaces aside), at most `limit`; None otherwise.

    `str.isdigit` alone is not enough: it accepts "²" and "٣", which `int`
    then refuses or reads as another number.
    """
    if text is None:
        return None
    text = text.strip(" ")
    if not text or not text.isascii() or not text.isdigit() or len(text) > len(str(limit)):
        return None
    number = int(text)
    return number if number <= limit else None


def json_document(text: str, max_chars: int) -> Any:
    """`text` parsed as JSON if it is at most `max_chars` long; ValueError otherwise (too long, not JSON, too deep)."""
    if len(text) > max_chars:
        raise ValueError(f"longer than {max_chars} characters")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:  # its message quotes none of the text
        raise ValueError(f"not JSON ({error.msg} at character {error.pos})") from None
    except RecursionError:  # nesting deeper than the parser recurses: "[[[[..."
        raise ValueError("nested too deep") from None


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` as it may be shown: at most `limit` characters of it, control characters, line breaks,
    terminal escapes and other unprintable ones written as \\xNN / \\uNNNN, the rest counted.

    A backslash is doubled, so an escape seen in the output was made here.
    """
    shown = []
    for char in text[:limit]:
        if char == "\\":
            shown.append("\\\\")
        elif char.isprintable():
            shown.append(char)
        elif ord(char) < 0x100:
            shown.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            shown.append(f"\\u{ord(char):04x}")
        else:
            shown.append(f"\\U{ord(char):08x}")
    more = len(text) - limit
    return "".join(shown) + (f"...(+{more} chars)" if more > 0 else "")


def kept(annotations: Mapping[str, Any], limits: Mapping[str, int]) -> dict[str, str]:
    """The annotations named in `limits`, each kept only if at most its limit long.

    An over-long value is replaced by a short note that no reader accepts, so
    what it belonged to (a loan record) reads as unreadable instead of being
    kept whole: a pod can carry 256 KiB of annotations, and every cache holds
    every pod.
    """
    found = {}
    for key, limit in limits.items():
        value = annotations.get(key)
        if isinstance(value, str):
            found[key] = value if len(value) <= limit else f"(not kept: {len(value)} characters, over {limit})"
    return found
