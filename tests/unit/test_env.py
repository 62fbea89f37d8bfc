"""kennel_env: the one true/false parser and the one CPU count both images use."""
from __future__ import annotations

import pytest

import kennel_env


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("TRUE", True), (" yes ", True), ("1", True), ("on", True), (True, True), (1, True),
    ("false", False), ("No", False), ("0", False), ("off", False), (False, False), (0, False),
])
def test_true_and_false_words(raw, expected):
    assert kennel_env.parse_bool(raw) is expected


@pytest.mark.parametrize("raw", ["", "maybe", "2", "y", "t", None, 1.0, [], "truee"])
def test_anything_else_is_refused_naming_the_words(raw):
    with pytest.raises(ValueError, match="expected true or false"):
        kennel_env.parse_bool(raw)


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "50000 100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
])
def test_cgroup_quota_v2_and_v1(tmp_path, files, expected):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    assert kennel_env.cgroup_cpu_quota(tmp_path) == expected


@pytest.mark.parametrize("quota, cpus", [
    ("150000 100000", 2),   # 1.5 CPUs: two single-threaded workers beat one
    ("120000 100000", 1),   # 1.2: rounded, not raised
    ("250000 100000", 3),
    ("100000 100000", 1),
    ("20000 100000", 1),    # never zero
    ("max 100000", 8),
])
def test_usable_cpus_is_the_affinity_capped_by_the_rounded_quota(tmp_path, monkeypatch, quota, cpus):
    monkeypatch.setattr(kennel_env.os, "sched_getaffinity", lambda _pid: set(range(8)))
    (tmp_path / "cpu.max").write_text(quota + "\n")
    assert kennel_env.usable_cpus(tmp_path) == cpus


def test_a_cpuset_smaller_than_the_quota_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(kennel_env.os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert kennel_env.usable_cpus(tmp_path) == 3
    assert kennel_env.usable_cpus(tmp_path / "absent") == 3
