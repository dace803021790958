"""`migchain chains diff`: what an edit changes for the scheduler."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given

from extender.cli import main as migchain
from extender.config import load_rules
from extender.core.chains_diff import diff_rules
from tests.strategies import chain_rules

ROOT = Path(__file__).resolve().parents[2]
A100 = (ROOT / "chains" / "a100-40gb.yaml").read_text()


@given(rules=chain_rules())
def test_rules_compared_with_themselves_change_nothing(rules):
    assert diff_rules(rules, rules) == []


def rules_of(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path, load_rules([path])


def test_a_type_added_and_a_policy_change_are_named_with_who_gains_what(tmp_path: Path):
    _, old = rules_of(tmp_path, "old.yaml", A100)
    edited = A100.replace("maxSteps: 3", "maxSteps: 2").replace(
        "returnMode: on-demand", "returnMode: eager\n  reclaimAfterSeconds: 300"
    )
    _, new = rules_of(tmp_path, "new.yaml", edited)
    lines = diff_rules(old, new)
    assert "chain a100-40gb: policy maxSteps: 3 => 2" in lines
    assert "chain a100-40gb: policy returnMode: on-demand => eager" in lines
    assert "chain a100-40gb: policy reclaimAfterSeconds: 120 => 300" in lines
    assert "on NVIDIA-A100-SXM4-40GB: 1g.5gb may no longer borrow 3g.20gb (3 steps up chain a100-40gb)" in lines
    assert not any("may now borrow" in line for line in lines)


def test_a_type_removed_from_a_chain_shortens_the_steps_of_those_above_it(tmp_path: Path):
    _, old = rules_of(tmp_path, "old.yaml", A100)
    _, new = rules_of(tmp_path, "new.yaml", A100.replace("      - nvidia.com/mig-1g.10gb\n", "", 1).replace(
        "    - nvidia.com/mig-1g.10gb\n", "", 1))  # fmt: skip
    lines = diff_rules(old, new)
    assert any(line.startswith("chain a100-40gb: types 1g.5gb -> 1g.10gb -> 2g.10gb") for line in lines)
    assert "on NVIDIA-A100-SXM4-40GB: 1g.5gb may no longer borrow 1g.10gb (1 step up chain a100-40gb)" in lines
    assert any("1g.5gb borrows 2g.10gb at 1 steps, was 2" in line for line in lines)


def test_the_command_exits_like_diff(tmp_path: Path, capsys):
    old, _ = rules_of(tmp_path, "old.yaml", A100)
    new, _ = rules_of(tmp_path, "new.yaml", A100.replace("borrowing: true", "borrowing: false"))
    assert migchain(["chains", "diff", str(old), str(old)]) == 0
    assert "no change" in capsys.readouterr().out
    assert migchain(["chains", "diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "policy borrowing: true => false" in out and "may no longer borrow" in out
    broken = tmp_path / "broken.yaml"
    broken.write_text(A100.replace("maxSteps: 3", "maxSteps: x"))
    assert migchain(["chains", "diff", str(old), str(broken)]) == 2
    assert f"{broken}:" in capsys.readouterr().err
    assert migchain(["chains", "diff", str(ROOT / "chains"), str(ROOT / "chains")]) == 0


def test_a_pod_opt_outs_policy_change_is_named(tmp_path: Path):
    _, old = rules_of(tmp_path, "old.yaml", A100)
    edited = A100.replace(
        "returnMode: on-demand", "returnMode: on-demand\n  podOptOuts: {maxRestarts: true, namespaces: {include: [ml]}}"
    )
    _, new = rules_of(tmp_path, "new.yaml", edited)
    assert diff_rules(old, new) == ["chain a100-40gb: policy podOptOuts: none => maxRestarts in namespaces ml"]
