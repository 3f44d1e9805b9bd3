"""Tests for tools/analyze.py: the paper's fig. 2 for a checkpoint, end to end on the demo's (and
the same numbers from two processes as from one); its flags. The measures themselves (CKNNA, the
linear probe, the block features) are repa.py's, tested in test_repa.py."""
import json
import os
import subprocess
import sys

import pytest

import analyze
from test_demo import DEMO_PY, HERE, run_demo
from test_repa import DEMO_FAST


def test_a_pixel_space_checkpoint_needs_its_own_data(tmp_path, capsys):
    from test_repa import save_ours
    save_ours(tmp_path / "pixels.pt", in_channels=3, input_size=16, patch_size=4)
    with pytest.raises(SystemExit) as exit_:
        analyze.main([str(tmp_path / "pixels.pt"), "--analyze-images", "20"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is a pixel-space model: measure it on its own data" in err


@pytest.mark.slow
def test_analyze_runs_end_to_end_on_the_demo_and_training_logs_alignment(tmp_path):
    train = run_demo(*DEMO_FAST, "--max-steps", "2", "--align-every", "1", "--align-images",
                     "64", "--results-dir", str(tmp_path))
    assert train.returncode == 0, train.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / "demo" / "metrics.jsonl")]
    logged = [r for r in rows if "cknna/demo-simclr-vit/block2" in r]
    assert [r["step"] for r in logged] == [1, 2] and "cknna/demo-simclr-vit/block6" in logged[0]
    assert 0 <= logged[0]["probe/block2"] <= 1 and logged[0]["fd_demo"] > 0  # and the judge's
    out = run_demo("--analyze", str(tmp_path / "demo"), "--analyze-images", "48",
                   "--analyze-t", "0,0.5", "--probe-epochs", "1", "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    (folder,) = (tmp_path / "demo" / "analysis").glob("0000002-*")  # the checkpoint, settings
    result = json.load(open(folder / "analysis.json"))
    assert result["settings"]["analyze_images"] == 48
    assert result["images"] == 48 and result["t"] == [0.0, 0.5] and result["knn"] == 10
    assert [len(v) for v in result["probe"].values()] == [6, 6]  # T/2 has 6 blocks
    (enc,) = result["encoders"].values()
    assert all(-1 <= c <= 1 for v in enc["cknna"].values() for c in v) and len(enc["cknna"]) == 2
    assert open(folder / "analysis.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_analyze_on_two_processes_equals_one(tmp_path):
    out = run_demo(*DEMO_FAST, "--max-steps", "1", "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    args = ["--analyze", str(tmp_path / "demo"), "--analyze-images", "30",
            "--analyze-t", "0.25", "--probe-epochs", "5"]
    one = run_demo(*args, "--results-dir", str(tmp_path / "elsewhere"))
    assert one.returncode == 0, one.stderr[-2000:]
    (result,) = (tmp_path / "demo" / "analysis").glob("0000001-*/analysis.json")  # in the run
    a = json.load(open(result))
    other = run_demo(*args[:-1], "6", "--results-dir", str(tmp_path / "elsewhere"))
    assert other.returncode == 0 and len(list(result.parent.parent.iterdir())) == 2  # one more
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", DEMO_PY, *args], capture_output=True, text=True,
                         timeout=300, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    b = json.load(open(result))
    # the gathered features are in the same order: the same numbers (up to batching's rounding)
    assert a["probe"] == b["probe"] and a["encoders"].keys() == b["encoders"].keys()
    for name, e in a["encoders"].items():
        assert e["cknna"]["0.25"] == pytest.approx(b["encoders"][name]["cknna"]["0.25"], abs=1e-3)


@pytest.mark.parametrize("flags,message", [
    (["x.pt", "--analyze-t", "0,2"], "--analyze-t must be comma-separated times"),
    (["x.pt", "--analyze-images", "12"], "--analyze-images must be more than"),
    (["x.pt", "--knn", "1"], "--knn must be at least 2"),
    (["x.pt", "--probe-holdout", "1"], "--probe-holdout must be in (0, 1)"),
    (["x.pt", "--enc-type", "dinov9-vit-b"], "unknown encoder 'dinov9-vit-b'")])
def test_bad_analysis_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        analyze.main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_reg_model_is_measured_with_its_encoders_class_token():
    # the demo's shapes, its encoder and a random REG SiT of their size: token 0 is that encoder's
    # class token (the demo's: the patches' mean), noised; the features average the patches only
    import dataclasses
    import demo
    import repa
    from test_repa import fill_
    model = fill_(repa.SiT(input_size=16, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                           encoder_depth=1, z_dims=[96], projector_dim=32, num_classes=10,
                           reg=True)).eval()
    encoders = demo.demo_encoders()
    args = (model, encoders, demo.DemoDataset(8), list(range(8)), [0.5],
            analyze.AnalyzeConfig(batch_size=4), {"input_size": 16, "path_type": "linear"}, "cpu")
    _, (enc,), sit = analyze.extract_features(*args)
    assert enc.shape == (8, 96) and sit.shape == (8, 1, 2, 32)
    encoders[0] = dataclasses.replace(encoders[0], cls="token")  # another class token: patch 0
    assert not analyze.extract_features(*args)[2].allclose(sit)
