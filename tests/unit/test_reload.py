"""Chain rules reloaded live: a good edit swaps in whole, a bad one changes nothing, a symlink swap is seen."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from extender import config
from extender.config import load_rules
from extender.metrics import watch_rules
from extender.reload import RulesInForce

ROOT = Path(__file__).resolve().parents[2]
A100 = (ROOT / "chains" / "a100-40gb.yaml").read_text()
SHORTER = A100.replace("      - nvidia.com/mig-7g.40gb\n", "")
BROKEN = A100.replace("maxSteps: 3", "maxSteps: -1")


def write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000  # a distinct mtime even on a coarse clock
    os.utime(path, ns=(stamp, stamp))


def types_of(rules: RulesInForce) -> tuple[str, ...]:
    [chain] = rules.current().chains
    return chain.types


def test_a_valid_edit_is_swapped_in_whole_and_readers_keep_what_they_took(tmp_path: Path):
    path = tmp_path / "a100.yaml"
    write(path, A100)
    rules = RulesInForce(load_rules([path]), [path])
    in_flight = rules.current()  # a request that started before the edit
    write(path, SHORTER)
    assert rules.reload_if_changed(settle=0)
    assert "nvidia.com/mig-7g.40gb" not in types_of(rules)
    assert "nvidia.com/mig-7g.40gb" in in_flight.chains[0].types  # finishes on the old rules
    assert rules.status().error == "" and rules.describe() == ""
    assert not rules.reload_if_changed(settle=0)  # nothing changed since


def test_a_bad_edit_keeps_the_last_good_rules_and_says_where_it_is_wrong(tmp_path: Path):
    path = tmp_path / "a100.yaml"
    write(path, A100)
    rules = RulesInForce(load_rules([path]), [path])
    registry = CollectorRegistry()
    watch_rules(registry, rules.status)
    good = rules.current()
    last_good = rules.status().last_good
    write(path, BROKEN)
    assert not rules.reload_if_changed(settle=0)
    assert rules.current() is good
    status = rules.status()
    assert status.failures == 1 and status.last_good == last_good
    assert f"{path}:" in status.error and "policy.maxSteps" in status.error
    assert "rejected" in rules.describe() and "policy.maxSteps" in rules.describe()
    assert registry.get_sample_value("migchain_config_reload_failures_total") == 1
    assert registry.get_sample_value("migchain_config_last_reload_rejected") == 1
    # fixing the file heals it
    write(path, SHORTER)
    assert rules.reload_if_changed(settle=0)
    assert registry.get_sample_value("migchain_config_last_reload_rejected") == 0
    assert (registry.get_sample_value("migchain_config_last_reload_success_timestamp_seconds") or 0) >= last_good


def test_a_configmap_symlink_swap_is_seen_and_a_file_gone_midway_changes_nothing(tmp_path: Path):
    """kubelet updates a mounted ConfigMap by writing a new timestamped folder and swapping the ..data symlink."""
    mount = tmp_path / "chains"
    mount.mkdir()
    first = mount / "..2026_11_25_01"
    first.mkdir()
    write(first / "a100-40gb.yaml", A100)
    (mount / "..data").symlink_to(first.name)
    (mount / "a100-40gb.yaml").symlink_to("..data/a100-40gb.yaml")
    path = mount / "a100-40gb.yaml"
    rules = RulesInForce(load_rules([path]), [path])

    second = mount / "..2026_11_25_02"
    second.mkdir()
    (second / "a100-40gb.yaml").write_text(SHORTER)
    os.utime(second / "a100-40gb.yaml", ns=(1, 1))  # an older mtime: only the swap reveals the change
    (mount / "..data_tmp").symlink_to(second.name)
    os.replace(mount / "..data_tmp", mount / "..data")  # atomic, as kubelet does
    assert rules.reload_if_changed(settle=0)
    assert "nvidia.com/mig-7g.40gb" not in types_of(rules)

    (mount / "..data").unlink()  # between two swaps the file may vanish for a moment
    assert not rules.reload_if_changed(settle=0)
    assert "nvidia.com/mig-7g.40gb" not in types_of(rules)  # the rules in force did not change
    assert rules.status().failures == 1
    (mount / "..data").symlink_to(second.name)
    assert rules.reload_if_changed(settle=0)
    assert rules.status().error == ""


def test_the_watch_thread_picks_up_an_edit_within_its_interval(tmp_path: Path):
    path = tmp_path / "a100.yaml"
    write(path, A100)
    rules = RulesInForce(load_rules([path]), [path])
    stop = threading.Event()
    thread = rules.watch(stop, interval=0.05)
    try:
        write(path, SHORTER)
        deadline = time.monotonic() + 30  # a hang detector, not a timing assertion
        while "nvidia.com/mig-7g.40gb" in types_of(rules):
            assert time.monotonic() < deadline, "the edit was never picked up"
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(5)


def test_an_edit_landing_while_the_rules_load_at_start_is_picked_up(tmp_path: Path, monkeypatch):
    path = tmp_path / "a100.yaml"
    write(path, A100)
    real_load = config.load_rules_at_start

    def load_then_edit(program, paths):
        loaded = real_load(program, paths)
        write(path, SHORTER)  # the admin's edit lands right after the files were read
        return loaded

    monkeypatch.setattr("extender.reload.load_rules_at_start", load_then_edit)
    rules = RulesInForce.at_start("test", [path])
    assert rules is not None and "nvidia.com/mig-7g.40gb" in types_of(rules)
    assert rules.reload_if_changed(settle=0)
    assert "nvidia.com/mig-7g.40gb" not in types_of(rules)


def test_fixed_rules_never_change():
    rules = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
    fixed = RulesInForce.fixed(rules)
    assert fixed.current() is rules
    assert not fixed.reload_if_changed(settle=0)
