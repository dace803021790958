"""The loan key's Secret: made once by `migchain loan-key`, read by the admin's commands to verify loans."""

from __future__ import annotations

import base64
from collections.abc import Callable

import urllib3

from extender.core.loan import MIN_LOAN_KEY_BYTES
from extender.kube.api import ApiError, KubeApi, path
from extender.loan_key import SECRET_ENTRY, SECRET_NAME, new_key, read_key_file

MIGCHAIN_NAMESPACE = "migchain-system"


def read_secret(api: KubeApi, namespace: str, name: str = SECRET_NAME) -> bytes | None:
    """The key the Secret holds; None when there is no such Secret. Raises ApiError (a 403, say) otherwise."""
    try:
        secret = api.get(path("api", "v1", "namespaces", namespace, "secrets", name))
    except ApiError as error:
        if error.status == 404:
            return None
        raise
    encoded = (secret.get("data") or {}).get(SECRET_ENTRY)
    key = base64.b64decode(encoded) if isinstance(encoded, str) else b""
    if len(key) < MIN_LOAN_KEY_BYTES:
        raise ApiError(0, "Invalid", f"Secret {namespace}/{name} holds no key of {MIN_LOAN_KEY_BYTES} bytes or more")
    return key


def create_secret(api: KubeApi, namespace: str, name: str = SECRET_NAME) -> bool:
    """Make the Secret with a new random key unless it exists (never replace one: every loan signed with it would
    stop being a loan). True when it was made. A create that raced another counts as existing."""
    if read_secret(api, namespace, name) is not None:
        return False
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "migchain"}},
        "data": {SECRET_ENTRY: base64.b64encode(new_key()).decode()},
    }
    try:
        api.create(path("api", "v1", "namespaces", namespace, "secrets"), body)
    except ApiError as error:
        if error.status != 409:
            raise
        return False
    return True


def admin_key(api: KubeApi, key_file: str | None, warn: Callable[[str], None]) -> bytes | None:
    """The key an admin's command verifies loans with: --loan-key-file, else the Secret if the user may read it.

    Without one the command shows loans as their annotations say, and `warn`s
    that they are not verified. Raises ValueError for a key file that cannot
    be used (the user asked for it).
    """
    if key_file:
        return read_key_file(key_file)
    try:
        key = read_secret(api, MIGCHAIN_NAMESPACE)
        problem = "it does not exist"
    except (ApiError, urllib3.exceptions.HTTPError, OSError) as error:
        key, problem = None, str(error)
    if key is None:
        warn(
            f"loans are shown as their annotations say, not verified: cannot read Secret "
            f"{MIGCHAIN_NAMESPACE}/{SECRET_NAME} ({problem}); give --loan-key-file"
        )
    return key
