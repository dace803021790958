"""`migchain certs` on a cluster: read the CA and leaf Secrets, store what renewal gives, restart kube-scheduler.

Run by the migchain-certs Job at install and the migchain-certs CronJob after.
Each run renews what is due (extender/certs.py, extender/core/renewal.py) and
is safe to repeat or to stop anywhere: every Secret is written with the
resourceVersion it was read at, the CA Secret first, and a run that finds
the Secrets half-updated finishes the work. kube-scheduler reads its CA file
only at start, so when the bundle it must trust changes, the run restarts
its Deployment (an annotation on the pod template, as `kubectl rollout
restart` does); a new CA signs only once that rollout is complete.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extender.certs import BUNDLE, LeafSpec, Stored, renew
from extender.kube.api import ApiError, KubeApi, path

# On the CA Secret: when its bundle last changed (RFC 3339).
BUNDLE_CHANGED = "migchain.io/bundle-changed"
# On the scheduler Deployment's pod template: a hash of the bundle its pods were started with.
TRUST_BUNDLE = "migchain.io/trust-bundle"
LABELS = {"app.kubernetes.io/part-of": "migchain"}


@dataclass(frozen=True)
class _Secret:
    data: dict[str, bytes]
    annotations: dict[str, str]
    version: str  # resourceVersion; "" when the Secret does not exist
    type: str


def bundle_hash(bundle: bytes) -> str:
    return hashlib.sha256(bundle).hexdigest()[:16]


def renew_secrets(
    api: KubeApi,
    *,
    namespace: str,
    ca_secret: str,
    specs: Sequence[LeafSpec],
    scheduler: str,
    now: datetime.datetime,
) -> int:
    """Renew what is due; prints what changed and why. Exit code: 0, or 1 when the API server refused or failed."""
    secrets = path("api", "v1", "namespaces", namespace, "secrets")
    client = next(spec.secret for spec in specs if spec.client)  # the scheduler's: the bundle it trusts
    try:
        read = {name: _read_secret(api, f"{secrets}/{name}") for name in (ca_secret, *(s.secret for s in specs))}
        client_bundle = read[client].data.get(BUNDLE, b"")
        deployment = _deployment(api, namespace, scheduler) if scheduler else None
    except ApiError as error:
        print(f"migchain certs: cannot read the certificates in {namespace}: {error}", file=sys.stderr)
        return 1
    changed = read[ca_secret].annotations.get(BUNDLE_CHANGED)
    stored = Stored(
        read[ca_secret].data,
        {spec.secret: read[spec.secret].data for spec in specs},
        datetime.datetime.fromisoformat(changed) if changed else None,
    )
    loaded = deployment is None or _runs_with(deployment, bundle_hash(client_bundle))
    plan, after = renew(stored, specs, now, bundle_loaded=loaded)
    for reason in plan.reasons:
        print(reason)
    wanted = {ca_secret: after.authority} | {spec.secret: after.leaves.get(spec.secret, {}) for spec in specs}
    annotations = {ca_secret: {BUNDLE_CHANGED: after.bundle_changed.isoformat()} if after.bundle_changed else {}}
    try:
        for name, data in wanted.items():  # the CA first: leaves are never stored ahead of the CA that signed them
            if data and (data != read[name].data or annotations.get(name, {}).items() - read[name].annotations.items()):
                kind = "Opaque" if name == ca_secret else "kubernetes.io/tls"
                _write_secret(
                    api,
                    secrets,
                    name=name,
                    namespace=namespace,
                    kind=kind,
                    data=data,
                    annotations=annotations.get(name, {}),
                    before=read[name],
                )
                print(f"{'updated' if read[name].version else 'created'} Secret {namespace}/{name}")
        bundle = after.leaves.get(client, {}).get(BUNDLE, b"")
        if deployment is not None and _template_annotations(deployment).get(TRUST_BUNDLE) != bundle_hash(bundle):
            _restart(api, namespace, scheduler, bundle_hash(bundle))
            print(
                f"restarting Deployment {namespace}/{scheduler}: kube-scheduler reads the CA bundle it trusts only "
                "at start, and that bundle changed"
            )
    except ApiError as error:
        print(
            f"migchain certs: cannot store the certificates in {namespace} (the next run finishes): {error}",
            file=sys.stderr,
        )
        return 1
    if not plan.changes and after == stored:
        print(f"nothing is due in {namespace}")
    return 0


def _read_secret(api: KubeApi, resource: str) -> _Secret:
    try:
        secret = api.get(resource)
    except ApiError as error:
        if error.status == 404:
            return _Secret({}, {}, "", "")
        raise
    data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
    metadata = secret.get("metadata", {})
    return _Secret(data, dict(metadata.get("annotations") or {}), metadata.get("resourceVersion", ""), secret["type"])


def _write_secret(
    api: KubeApi,
    secrets: str,
    *,
    name: str,
    namespace: str,
    kind: str,
    data: Mapping[str, bytes],
    annotations: Mapping[str, str],
    before: _Secret,
) -> None:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": before.type or kind,  # a Secret's type cannot change: an existing one keeps its own
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": LABELS,
            "annotations": before.annotations | dict(annotations),
        },
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
    }
    if not before.version:
        api.create(secrets, body)
        return
    # PUT with the resourceVersion read: a concurrent run (the Job and the
    # CronJob at once) gets 409 Conflict instead of overwriting the other's CA.
    body["metadata"]["resourceVersion"] = before.version
    api.request("PUT", f"{secrets}/{name}", body)


def _deployment(api: KubeApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return api.get(path("apis", "apps", "v1", "namespaces", namespace, "deployments", name))
    except ApiError as error:
        if error.status == 404:
            return None  # no scheduler to restart (yet): it reads the bundle when it starts
        raise


def _template_annotations(deployment: Mapping[str, Any]) -> dict[str, str]:
    template = deployment.get("spec", {}).get("template", {})
    return dict(template.get("metadata", {}).get("annotations") or {})


def _runs_with(deployment: Mapping[str, Any], bundle: str) -> bool:
    """The Deployment's pods all run the template that carries this bundle's hash (its rollout is complete)."""
    if _template_annotations(deployment).get(TRUST_BUNDLE) != bundle:
        return False
    wanted = deployment.get("spec", {}).get("replicas", 1)
    status = deployment.get("status", {})
    return bool(
        status.get("observedGeneration", 0) >= deployment.get("metadata", {}).get("generation", 0)
        and status.get("updatedReplicas", 0) == wanted
        and status.get("replicas", 0) == wanted
        and status.get("availableReplicas", 0) >= wanted
    )


def _restart(api: KubeApi, namespace: str, name: str, bundle: str) -> None:
    api.patch(
        path("apis", "apps", "v1", "namespaces", namespace, "deployments", name),
        {"spec": {"template": {"metadata": {"annotations": {TRUST_BUNDLE: bundle}}}}},
    )
