"""The chain rule loader: every shipped file validates; every broken one names file, line and field."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from extender.config import ConfigError, load_rules
from extender.core.mig import parse_mig_resource
from extender.core.rules import ReturnMode

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "chains"
SHIPPED = sorted((ROOT / "chains").glob("*.yaml"))


def problems_of(*names: str) -> list[tuple[str, int, str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_rules([FIXTURES / name for name in names])
    return [(Path(p.file).name, p.line, p.field, p.message) for p in caught.value.problems]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_chain_file_validates_and_steps_never_shrink(path):
    rules = load_rules([path])
    assert rules.chains
    for chain in rules.chains:
        assert chain.gpu_products
        profiles = [parse_mig_resource(t) for t in chain.types]
        for small, large in itertools.pairwise(profiles):
            assert large.memory_gb >= small.memory_gb and large.compute_slices >= small.compute_slices
        assert chain.policy.return_mode is ReturnMode.ON_DEMAND


def test_the_shipped_fleets_cover_the_gpu_models_the_users_asked_for():
    products = {p for path in SHIPPED for chain in load_rules([path]).chains for p in chain.gpu_products}
    for model in ("A100-SXM4-40GB", "A100-SXM4-80GB", "H100-80GB-HBM3", "H200", "A30"):
        assert f"NVIDIA-{model}" in products


@pytest.mark.parametrize(
    ("fixture", "line", "field", "message"),
    [
        ("unknown-key.yaml", 6, "chains[0].typo", "unknown key"),
        ("duplicate-type.yaml", 9, "chains[0].types[2]", "listed twice"),
        ("malformed-resource.yaml", 8, "chains[0].types[1]", "not a MIG resource name"),
        ("negative-max-steps.yaml", 8, "policy.maxSteps", "must be 0 or more"),
        ("shrinking-step.yaml", 9, "chains[0].types[2]", "less memory or compute than nvidia.com/mig-4g.20gb"),
        ("duplicate-key.yaml", 5, "chains[0].name", "duplicate key"),
        ("bad-yaml.yaml", 6, "", "not valid YAML"),
        ("empty.yaml", 1, "", "the file is empty"),
    ],
)
def test_a_broken_file_names_its_file_line_and_field(fixture, line, field, message):
    [(file, got_line, got_field, got_message)] = problems_of(fixture)
    assert (file, got_line, got_field) == (fixture, line, field)
    assert message in got_message


def test_every_problem_of_a_file_is_reported_at_once():
    found = {(line, field) for _, line, field, _ in problems_of("many-problems.yaml")}
    assert found == {
        (1, "apiVersion"),
        (4, "chains[0].name"),  # not a DNS label
        (5, "chains[0].gpuProducts"),  # empty
        (6, "chains[0].types"),  # one type is no chain
        (11, "policy.borrowing"),  # not a boolean
        (12, "policy.returnMode"),
        (13, "policy.allowedTypes[0]"),  # on no chain of the file
        (15, "policy.namespaces.include[0]"),  # YAML reads `on` as a boolean
    }


def test_a_chain_name_defined_in_two_files_names_both():
    [(file, line, field, message)] = problems_of("first.yaml", "second.yaml")
    assert (file, line, field) == ("second.yaml", 4, "chains[0].name")
    assert "first.yaml:4" in message


def test_a_missing_file_is_a_config_error_not_a_crash():
    [(file, _, _, message)] = problems_of("no-such-file.yaml")
    assert file == "no-such-file.yaml"
    assert "cannot read" in message


def test_the_error_text_reads_file_colon_line():
    with pytest.raises(ConfigError) as caught:
        load_rules([FIXTURES / "negative-max-steps.yaml"])
    assert str(caught.value).endswith("negative-max-steps.yaml:8: policy.maxSteps: must be 0 or more")


@pytest.mark.parametrize(
    ("policy", "dry_in", "live_in"),
    [
        ("dryRun: true", ["ml", "kube-system"], []),
        ("dryRun: false", [], ["ml"]),
        ("dryRun: {namespaces: {include: [ml]}}", ["ml"], ["prod"]),
        ("dryRun: {namespaces: {exclude: [prod]}}", ["ml"], ["prod"]),
        ("", [], ["ml"]),
    ],
)
def test_dry_run_is_a_policy_switch_for_all_or_some_namespaces(tmp_path, policy, dry_in, live_in):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n  - name: c\n    gpuProducts: [G]\n"
        "    types: [nvidia.com/mig-1g.5gb, nvidia.com/mig-2g.10gb]\n"
        f"policy:\n  borrowing: true\n  {policy}\n"
    )
    rules = load_rules([rules_file])
    assert all(rules.dry_run(["c"], namespace) for namespace in dry_in)
    assert not any(rules.dry_run(["c"], namespace) for namespace in live_in)
    assert not rules.dry_run(["other-chain"], "ml")


@pytest.mark.parametrize(
    ("policy", "field"),
    [("dryRun: maybe", "policy.dryRun"), ("dryRun: {namespaces: [ml]}", "policy.dryRun.namespaces"),
     ("dryRun: {}", "policy.dryRun.namespaces"), ("dryRun: {every: true}", "policy.dryRun.every")],
)  # fmt: skip
def test_a_bad_dry_run_switch_names_its_field(tmp_path, policy, field):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n  - name: c\n    gpuProducts: [G]\n"
        "    types: [nvidia.com/mig-1g.5gb, nvidia.com/mig-2g.10gb]\n"
        f"policy:\n  {policy}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_rules([rules_file])
    assert next((p.line, p.field) for p in caught.value.problems) == (8, field)


def rules_with_policy(tmp_path: Path, policy: str) -> Path:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n  - name: c\n    gpuProducts: [G]\n"
        "    types: [nvidia.com/mig-1g.5gb, nvidia.com/mig-2g.10gb]\n"
        f"policy:\n  {policy}\n"
    )
    return rules_file


@pytest.mark.parametrize(
    ("policy", "return_in", "caps_in", "neither_in"),
    [
        ("returnMode: eager", [], [], ["ml"]),  # the default: the chain's returnMode decides, not the pod
        ("podOptOuts: {return: true, maxRestarts: true}", ["ml"], ["ml"], []),
        ("podOptOuts: {maxRestarts: true}", [], ["ml"], []),
        ("podOptOuts: {return: true, namespaces: {include: [ml]}}", ["ml"], [], ["prod"]),
        ("podOptOuts: {return: true, maxRestarts: true, namespaces: {exclude: [prod]}}", ["ml"], ["ml"], ["prod"]),
        ("podOptOuts: {return: false, maxRestarts: false}", [], [], ["ml"]),
    ],
)
def test_pod_opt_outs_are_honoured_only_where_the_policy_says(tmp_path, policy, return_in, caps_in, neither_in):
    [chain] = load_rules([rules_with_policy(tmp_path, policy)]).chains
    opt_outs = chain.policy.pod_opt_outs
    assert all(opt_outs.honours_return(namespace) for namespace in return_in)
    assert all(opt_outs.honours_max_restarts(namespace) for namespace in caps_in)
    for namespace in neither_in:
        assert not opt_outs.honours_return(namespace) and not opt_outs.honours_max_restarts(namespace)


@pytest.mark.parametrize(
    ("policy", "field", "message"),
    [("podOptOuts: true", "policy.podOptOuts", "expected a mapping"),
     ("podOptOuts: {return: maybe}", "policy.podOptOuts.return", "expected true or false"),
     ("podOptOuts: {restarts: true}", "policy.podOptOuts.restarts", "unknown key"),
     ("podOptOuts: {maxRestarts: 2}", "policy.podOptOuts.maxRestarts", "expected true or false"),
     ("podOptOuts: {namespaces: [ml]}", "policy.podOptOuts.namespaces", "expected a mapping")],
)  # fmt: skip
def test_a_bad_pod_opt_outs_policy_names_its_file_line_and_field(tmp_path, policy, field, message):
    with pytest.raises(ConfigError) as caught:
        load_rules([rules_with_policy(tmp_path, policy)])
    [problem] = caught.value.problems
    assert (Path(problem.file).name, problem.line, problem.field) == ("rules.yaml", 8, field)
    assert message in problem.message
