"""The command lines: `migchain chains validate` exit codes and messages; the extender refuses bad rules."""

from __future__ import annotations

from pathlib import Path

from extender import cli, serve

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "fixtures" / "chains" / "negative-max-steps.yaml"


def test_validate_accepts_the_shipped_files(capsys):
    assert cli.main(["chains", "validate", str(ROOT / "chains" / "a100-40gb.yaml")]) == 0
    assert "chain a100-40gb: 1g.5gb -> 1g.10gb -> 2g.10gb" in capsys.readouterr().out


def test_validate_exits_1_and_names_file_line_field(capsys):
    assert cli.main(["chains", "validate", str(BROKEN)]) == 1
    err = capsys.readouterr().err
    assert f"{BROKEN}:8: policy.maxSteps: must be 0 or more" in err
    assert "1 problem(s) found" in err


def test_the_extender_will_not_start_on_bad_rules(capsys):
    assert serve.main(["--chains", str(BROKEN)]) == 2
    assert "policy.maxSteps" in capsys.readouterr().err
