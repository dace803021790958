"""Policies of several rule files over the same chains: a denial in any file wins (issue 18, item 8)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from extender import cli
from extender.config import load_rules
from extender.core.cluster import NodeState, PodRequest
from extender.core.decide import Placement, Rejection, place
from extender.core.rules import Chain, ChainRules, NamespaceSelector, Policy
from tests.strategies import NAMESPACES, PRODUCTS, TYPES, chain_rules, policies

A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
G3 = "nvidia.com/mig-3g.20gb"


def write(folder: Path, name: str, chains: str, policy: str = "") -> Path:
    path = folder / name
    path.write_text(f"apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n{chains}{policy}")
    return path


def chain_yaml(name: str, *types: str) -> str:
    listed = "".join(f"      - {t}\n" for t in types)
    return f"  - name: {name}\n    gpuProducts: [{A100}]\n    types:\n{listed}"


def allowed(rules: ChainRules, requested: str, namespace: str) -> dict[str, int]:
    return {o.granted: o.steps for o in rules.borrow_options(requested, A100, namespace) if o.allowed}


def test_a_namespace_one_file_excludes_borrows_along_no_overlapping_chain_of_another(tmp_path):
    strict = write(
        tmp_path, "strict.yaml", chain_yaml("strict", G1, G2), "policy:\n  namespaces: {exclude: [secure]}\n"
    )
    loose = write(tmp_path, "loose.yaml", chain_yaml("loose", G1, G2, G3))
    rules = load_rules([strict, loose])
    assert allowed(rules, G1, "secure") == {}  # was {2g.10gb: 1, 3g.20gb: 2}: the exclusion was bypassed
    assert allowed(rules, G1, "team-a") == {G2: 1, G3: 2}
    options = rules.borrow_options(G1, A100, "secure")
    assert {o.granted for o in options} == {G2, G3}
    assert all("namespace secure is not covered by the policy of chain strict" in (o.denied or "") for o in options)
    verdict = place(
        PodRequest("secure", "p", "uid", ((G1, 1),)), NodeState("n", A100, "success", {G3: 1}, {}), "n", rules
    )
    assert isinstance(verdict, Rejection)
    assert "namespace secure is not covered by the policy of chain strict" in verdict.reason


def test_a_type_one_file_does_not_lend_is_not_lent_along_another_files_chain(tmp_path):
    narrow = write(tmp_path, "narrow.yaml", chain_yaml("narrow", G1, G2, G3), f"policy:\n  allowedTypes: [{G2}]\n")
    wide = write(tmp_path, "wide.yaml", chain_yaml("wide", G1, G3))
    rules = load_rules([narrow, wide])
    assert allowed(rules, G1, "default") == {G2: 1}  # 3g.20gb: narrow's allowedTypes holds
    [denied] = [o for o in rules.borrow_options(G1, A100, "default") if not o.allowed]
    assert denied.granted == G3 and "allowedTypes of chain narrow" in (denied.denied or "")


def test_within_one_file_the_chains_still_add_up(tmp_path):
    """One admin wrote both chains of one file under one policy: a shorter chain is a deliberate shortcut."""
    both = write(
        tmp_path, "both.yaml", chain_yaml("long", G1, G2, G3) + chain_yaml("short", G1, G3), "policy:\n  maxSteps: 1\n"
    )
    assert allowed(load_rules([both]), G1, "default") == {G2: 1, G3: 1}


def test_files_that_agree_still_offer_the_fewest_steps(tmp_path):
    one = write(tmp_path, "one.yaml", chain_yaml("one", G1, G2, G3))
    two = write(tmp_path, "two.yaml", chain_yaml("two", G1, G3))
    options = {o.granted: (o.steps, o.chain) for o in load_rules([one, two]).borrow_options(G1, A100, "default")}
    assert options == {G2: (1, "one"), G3: (1, "two")}


def files(rules: ChainRules, source: str) -> list[Chain]:
    return [Chain(c.name, c.gpu_products, c.types, c.policy, source) for c in rules.chains]


@given(
    base=chain_rules(),
    extra=chain_rules(),
    policy=policies(),
    namespace=st.sampled_from(NAMESPACES),
    asked=st.tuples(st.sampled_from(TYPES), st.sampled_from(PRODUCTS)),
)
def test_adding_a_file_that_denies_a_namespace_never_allows_a_borrow_there(base, extra, policy, namespace, asked):
    """Whatever the other files say: with one more file excluding `namespace`, nothing borrows there that did
    not before; and nothing at all for a request that file's chains cover."""
    requested, product = asked
    denying = Policy(
        borrowing=policy.borrowing,
        max_steps=policy.max_steps,
        allowed_types=policy.allowed_types,
        namespaces=NamespaceSelector(policy.namespaces.include, policy.namespaces.exclude | {namespace}),
    )
    before = ChainRules(files(base, "base.yaml"))
    added = [Chain(f"x-{c.name}", c.gpu_products, c.types, denying, "denying.yaml") for c in extra.chains]
    after = ChainRules([*before.chains, *added])
    was = {o.granted for o in before.borrow_options(requested, product, namespace) if o.allowed}
    now = {o.granted for o in after.borrow_options(requested, product, namespace) if o.allowed}
    assert now <= was
    covers = any(requested in c.types[:-1] and product in c.gpu_products for c in added)
    if covers:
        assert now == set()


@given(
    base=chain_rules(), extra=chain_rules(), namespace=st.sampled_from(NAMESPACES), product=st.sampled_from(PRODUCTS)
)
def test_a_file_never_makes_a_borrow_allowed_that_another_file_denies(base, extra, namespace, product):
    """Adding a file can add borrows only where no loaded file's policy denies them."""
    first = ChainRules(files(base, "a.yaml"))
    both = ChainRules([*first.chains, *files(extra, "b.yaml")])
    for requested in TYPES:
        denied_before = {o.granted for o in first.borrow_options(requested, product, namespace) if not o.allowed}
        now = {o.granted for o in both.borrow_options(requested, product, namespace) if o.allowed}
        assert not denied_before & now


def test_place_refuses_the_bypass_end_to_end_on_the_shipped_a100_file(tmp_path):
    """The shipped a100-40gb.yaml excludes kube-system; a second file over the same types must not undo it."""
    shipped = Path(__file__).resolve().parents[2] / "chains" / "a100-40gb.yaml"
    other = write(tmp_path, "other.yaml", chain_yaml("other", G1, G2))
    rules = load_rules([shipped, other])
    verdict = place(
        PodRequest("kube-system", "p", "uid", ((G1, 1),)), NodeState("n", A100, "success", {G2: 1}, {}), "n", rules
    )
    assert not isinstance(verdict, Placement) or not verdict.borrows


def test_validate_warns_of_chains_of_two_files_that_overlap(tmp_path, capsys):
    strict = write(
        tmp_path, "strict.yaml", chain_yaml("strict", G1, G2), "policy:\n  namespaces: {exclude: [secure]}\n"
    )
    loose = write(tmp_path, "loose.yaml", chain_yaml("loose", G1, G2, G3))
    apart = write(tmp_path, "apart.yaml", chain_yaml("apart", G3, "nvidia.com/mig-4g.20gb"))  # lends for 3g only
    assert cli.main(["chains", "validate", str(strict), str(loose), str(apart)]) == 0  # valid: a warning only
    err = capsys.readouterr().err
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert f"chain loose ({loose}) and chain strict ({strict}) both lend for 1g.5gb on {A100}" in warning
    assert "different policies" in warning and "a denial in either file's policy wins" in warning


def test_validate_is_quiet_for_files_that_do_not_overlap(capsys):
    shipped = Path(__file__).resolve().parents[2] / "chains"
    names = ("a100-40gb.yaml", "a100-80gb.yaml", "h100-80gb.yaml", "h200-141gb.yaml", "a30-24gb.yaml")
    assert cli.main(["chains", "validate", *(str(shipped / name) for name in names)]) == 0
    assert "warning" not in capsys.readouterr().err
