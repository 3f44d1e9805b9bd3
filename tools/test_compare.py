"""Tests for tools/compare.py: the speed-up read along two runs' FD_demo curves, what sets it,
and the report of two finished runs from the command line. --compare's training: test_demo.py."""
import json
import os

import pytest

import compare


def test_steps_to_reach_interpolates_between_measurements():
    steps, values = [100, 200, 300], [50.0, 30.0, 10.0]
    assert compare.steps_to_reach(steps, values, 20.0) == 250  # halfway from 30 to 10
    assert compare.steps_to_reach(steps, values, 60.0) == 100  # already at the first measurement
    assert compare.steps_to_reach(steps, values, 5.0) is None  # never


def test_speedups_read_along_the_run_use_only_what_repa_had_measured_by_then():
    vanilla = ([100, 200, 300, 400], [50.0, 30.0, 20.0, 5.0])
    repa_ = ([100, 200, 300, 400], [60.0, 20.0, 25.0, 6.0])
    # 100: REPA's 60 has not reached 50 (its 20 at step 200 comes later); 200: 30 is reached
    # between 100 and 200, at 100 + 100 * (60 - 30) / (60 - 20) = 175; 300: 20 at step 200;
    # 400: 5 never
    assert compare.speedups(vanilla, repa_) == [None, 200 / 175, 1.5, None]


def test_gap_and_slope_read_a_power_law_and_predict_the_speedup():
    steps = [250, 500, 750, 1000]
    vanilla = (steps, [90 * n ** -0.9 for n in steps])  # falls as step^-0.9
    repa_ = (steps, [v / 1.25 for v in vanilla[1]])  # 1.25 times lower at every step
    r, s = compare.gap_and_slope(vanilla, repa_)
    assert r == pytest.approx(1.25) and s == pytest.approx(0.9)
    # REPA reaches vanilla's value of step 1000 at 1000 / 1.25^(1/0.9) = 780.6 on the power law;
    # speedups reads a little less, as it interpolates linearly between measurements
    assert compare.speedups(vanilla, repa_)[-1] == pytest.approx(1.25 ** (1 / 0.9), rel=0.02)
    # only the last two measurements set the slope, and only the last the gap
    early = (steps, [500.0, 7.0, *vanilla[1][2:]])
    assert compare.gap_and_slope(early, (steps, [1.0, 99.0, *repa_[1][2:]])) == pytest.approx(
        (r, s))
    text = compare.explain_speedup(vanilla, repa_)
    assert "FD_demo is 1.25 times REPA's, and vanilla's falls as step^-0.90" in text
    assert "1.25^(1/0.90) = 1.28x fewer steps" in text
    rising = ([500, 1000], [10.0, 11.0])
    assert compare.explain_speedup(rising, ([500, 1000], [9.0, 8.8])) == (
        "At the last step vanilla's FD_demo is 1.25 times REPA's, and vanilla's did not fall over "
        "its last two measurements.")


def test_compare_reads_a_step_measured_twice_once(tmp_path):
    # killed after measuring step 20 but before its checkpoint, a run resumes at step 10 and
    # measures step 20 again: one row per step, the later one, or the table's rows shift
    rows = [{"step": 10, "fd_demo": 5.0}, {"step": 20, "fd_demo": 4.0}, {"resumed_at": 10},
            {"step": 10, "loss": 0.3}, {"step": 20, "fd_demo": 3.5}, {"step": 30, "fd_demo": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare.metric_curves(tmp_path)["fd_demo"] == ([10, 20, 30], [5.0, 3.5, 3.0])


def fake_run(folder, fds, cfg_prob=0.1):  # a run folder as training leaves it, measured
    os.makedirs(folder)
    rows = [{"step": 1, "loss": 0.5}] + [
        {"step": s, "fd_demo": v, "class_acc": 0.5, "cknna/enc/block2": 0.1, "probe/block2": 0.3}
        for s, v in fds]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.json").write_text(json.dumps({"config": {"cfg_prob": cfg_prob}}))


def test_the_command_reports_on_two_finished_runs(tmp_path, capsys):
    fake_run(tmp_path / "a", [(100, 50.0), (200, 30.0)])
    fake_run(tmp_path / "b", [(100, 40.0), (200, 20.0)])
    compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    # b's FD_demo reaches a's final 30 between its 40 at 100 and 20 at 200: at step 150
    assert "b reaches a's final FD_demo (30.0 at step 200) at step 150: 1.3x fewer steps" in \
        capsys.readouterr().out
    report = (tmp_path / "compare.md").read_text()
    assert "| 200 | 30 | 20 | 0.5 | 0.5 | 0.1 | 0.1 | 0.3 | 0.3 | 1.33x |" in report
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    fake_run(tmp_path / "c", [(100, 40.0), (300, 20.0)])
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "a"), str(tmp_path / "c")])
    assert "were measured at different steps" in capsys.readouterr().err
