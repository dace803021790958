"""The command lines: `migchain chains validate` exit codes and messages; the extender refuses bad rules."""

from __future__ import annotations

import json
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


def test_simulate_prints_every_policy_beside_the_bounds(tmp_path, capsys):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "gpusPerNode: 2\ngpus:\n  - product: NVIDIA-A100-SXM4-40GB\n    count: 2\n    layout: all-balanced\n"
    )
    trace = tmp_path / "trace.csv"
    rows = [f"p{index},{index},1g.5gb,100" for index in range(5)]  # 2 GPUs hold 4 x 1g.5gb
    trace.write_text("name,arrival_s,type,runtime_s\n" + "\n".join(rows) + "\n")
    chains = str(ROOT / "chains" / "a100-40gb.yaml")
    args = ["simulate", "--fleet", str(fleet), "--chains", chains, "--workload", str(trace), "-o", "json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["runs"]) == {"static", "eager", "on-demand", "never", "recarve"}
    assert report["runs"]["static"]["borrows"] == 0
    assert report["runs"]["on-demand"]["borrows"] == 1  # the fifth 1g.5gb pod takes a larger slice
    assert (report["runs"]["never"]["borrows"], report["runs"]["never"]["restarts"]) == (1, 0)
    assert set(report["runs"]["static"]["p95_pending_by_type_s"]) == {"nvidia.com/mig-1g.5gb"}
    assert 0 < report["bounds"]["static"] <= report["bounds"]["borrowing"] <= report["bounds"]["fluid"] <= 1
    assert 0 < report["bounds"]["timed"] <= report["bounds"]["borrowing"]


def test_simulate_reports_a_bad_fleet_without_a_trace(tmp_path, capsys):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("gpus: []\n")
    args = ["simulate", "--fleet", str(fleet), "--chains", str(ROOT / "chains" / "a100-40gb.yaml"), "--workload", "x"]
    assert cli.main(args) == 1
    assert "gpus: expected a non-empty list" in capsys.readouterr().err
