"""migchain's loan key: the HMAC key loans are signed with, made once, read from a file at start."""

from __future__ import annotations

import secrets
from pathlib import Path

from extender.core.loan import MIN_LOAN_KEY_BYTES

# The Secret that holds it (made by `migchain loan-key`, mounted into the extender and the returner), and its one entry.
SECRET_NAME = "migchain-loan-key"
SECRET_ENTRY = "key"


class LoanKeyError(ValueError):
    """A loan key that cannot be used; the message says which file and why."""


def new_key() -> bytes:
    return secrets.token_bytes(MIN_LOAN_KEY_BYTES)


def read_key_file(path: str) -> bytes:
    """The key as the file holds it (a mounted Secret entry: the raw bytes), at least MIN_LOAN_KEY_BYTES long."""
    try:
        key = Path(path).read_bytes()
    except OSError as error:
        raise LoanKeyError(f"{path}: cannot read the loan key: {error.strerror or error}") from None
    if len(key) < MIN_LOAN_KEY_BYTES:
        raise LoanKeyError(f"{path}: a loan key needs at least {MIN_LOAN_KEY_BYTES} bytes, this one has {len(key)}")
    return key
