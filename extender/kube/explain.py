"""`migchain explain`: read the cluster and the chain files, print what the pure core makes of one pod.

The explanation itself (verdicts, scores, policy lines, the loan's return)
comes from `extender.core.explain`; this module finds the files, lists the
objects, picks the candidate nodes and prints. It never writes to the cluster.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from extender.config import ConfigError, load_rules
from extender.core.cluster import MIGCHAIN_SCHEDULER, NodeState, ObjectError, pod_record
from extender.core.explain import candidate_nodes, explain, explain_document, explain_text
from extender.core.loan import loan_doubt, vouched
from extender.core.migconfig import RECORD_ANNOTATION, RecarveRecord, read_record, recarve_notes
from extender.core.rules import ChainRules
from extender.kube.snapshot import ClusterObjects, open_cluster

PROGRAM = "migchain explain"


def default_chain_files(folder: Path) -> list[str]:
    """chains/*.yaml under `folder` (the current directory), sorted; empty when there is none."""
    return sorted(str(path) for path in (folder / "chains").glob("*.yaml"))


def load_chains(given: Sequence[str] | None, err: IO[str]) -> ChainRules | None:
    """The rules from --chains or chains/*.yaml; None after printing every problem as the loader words it."""
    files = list(given) if given else default_chain_files(Path.cwd())
    if not files:
        print(f"{PROGRAM}: no chain files: give --chains FILE..., or run where chains/*.yaml is", file=err)
        return None
    try:
        return load_rules(files)
    except ConfigError as error:
        print(error, file=err)
        print(f"{len(error.problems)} problem(s) found", file=err)
        return None


def render(
    cluster: ClusterObjects,
    rules: ChainRules,
    namespace: str,
    name: str,
    *,
    nodes: Sequence[str] | None,
    output: str,
    schedulers: Sequence[str] = (MIGCHAIN_SCHEDULER,),
) -> str:
    """The explanation of pod NAMESPACE/NAME in this cluster as text or JSON; raises ValueError if it cannot."""
    pod = next(
        (
            item
            for item in cluster.pods
            if (item.get("metadata") or {}).get("name") == name
            and ((item.get("metadata") or {}).get("namespace") or "default") == namespace
        ),
        None,
    )
    if pod is None:
        raise ValueError(f"pod {namespace}/{name} not found")
    try:
        written = pod_record(pod)
    except ObjectError as error:
        raise ValueError(f"pod {namespace}/{name} cannot be read: {error}") from error
    record, rejected = vouched(written, cluster.loan_key)
    if nodes:
        candidates, source = list(nodes), "given with --nodes"
    else:
        candidates = candidate_nodes(record.request, cluster.snapshot)
        source = f"the nodes it may run on: {record.request.constraints.describe()}"
    explanation = explain(
        record,
        cluster.snapshot,
        rules,
        candidates,
        cluster.records,
        candidates_from=source,
        schedulers=schedulers,
        loan_doubt=loan_doubt(written, rejected),
    )
    if not record.node and not record.terminal:
        notes = recarve_notes(record.request, _recarves(cluster))
        explanation = dataclasses.replace(explanation, notes=(*explanation.notes, *notes))
    if output == "json":
        return json.dumps(explain_document(explanation), indent=2)
    return explain_text(explanation)


def _recarves(cluster: ClusterObjects) -> list[tuple[NodeState, RecarveRecord]]:
    """The nodes with a re-carve record (core/migconfig.py RECORD_ANNOTATION) that can be read."""
    found = []
    for obj in cluster.nodes:
        metadata = obj.get("metadata") or {}
        text = (metadata.get("annotations") or {}).get(RECORD_ANNOTATION)
        node = cluster.snapshot.nodes.get(metadata.get("name", ""))
        record = read_record(text) if isinstance(text, str) else None
        if node is not None and isinstance(record, RecarveRecord):
            found.append((node, record))
    return found


def run(
    name: str,
    namespace: str,
    *,
    kubeconfig: str | None,
    chains: Sequence[str] | None,
    nodes: Sequence[str] | None,
    output: str,
    schedulers: Sequence[str] = (MIGCHAIN_SCHEDULER,),
    loan_key_file: str | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Print the explanation; exit 1 on bad chain files, an unreachable cluster or an unknown pod."""
    out, err = out or sys.stdout, err or sys.stderr  # looked up now: tests and callers may have replaced them
    rules = load_chains(chains, err)
    if rules is None:
        return 1
    try:
        cluster = open_cluster(kubeconfig, loan_key_file, lambda warning: print(f"{PROGRAM}: {warning}", file=err))
        text = render(cluster, rules, namespace, name, nodes=nodes, output=output, schedulers=schedulers)
    except ValueError as error:
        print(f"{PROGRAM}: {error}", file=err)
        return 1
    if cluster.skipped:
        print(f"{PROGRAM}: skipped {cluster.skipped} unreadable node or pod object(s), as the extender does", file=err)
    print(text, file=out)
    return 0
