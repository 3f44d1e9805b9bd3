"""Tests for tools/demo.py: the shapes, the SimCLR target, the judge, FD_demo, and --compare's
reading of the speed-up (steps to reach, gap and slope), down to the end-to-end runs (slow)."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import demo
import repa

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root
DEMO_PY = os.path.join(HERE, "tools", "demo.py")


def run_demo(*args, env=None, timeout=300):
    """tools/demo.py in a fresh process: training on the shapes through repa.train's seam."""
    return subprocess.run([sys.executable, DEMO_PY, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=HERE)


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """The demo's encoder and judge, pretrained for 2 steps into a cache of the test run's own (also
    for the subprocesses, through REPA_CACHE): the tests check the machinery, the slow test the
    real thing."""
    folder = str(tmp_path_factory.mktemp("repa-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPA_CACHE", folder)
        mp.setattr(demo, "DEMO_ENCODER_STEPS", 2)
        mp.setattr(demo, "DEMO_JUDGE_STEPS", 2)
        mp.setattr(repa, "linear_probe", lambda *args, **kwargs: 0.0)  # the encoder's probe
        demo.demo_encoders(), demo.demo_judge()
    os.environ["REPA_CACHE"] = folder
    yield folder


def long_axis(mask):
    """The angle of the long axis of each boolean mask (N, H, W) to the horizontal, in (-pi/2,
    pi/2], from its second central moments (which no shift of the origin changes)."""
    y, x = torch.arange(float(mask.shape[1]))[:, None], torch.arange(float(mask.shape[2]))
    m = mask.float()
    moment = lambda a, b: (m * a * b).sum((1, 2)) / m.sum((1, 2))
    cx, cy = moment(x, 1), moment(y, 1)
    return 0.5 * torch.atan2(2 * (moment(x, y) - cx * cy),
                             moment(x, x) - cx * cx - moment(y, y) + cy * cy)


def test_demo_dataset_is_class_conditional_and_in_the_reader_format():
    data = demo.DemoDataset(n=400)
    images, moments, labels = data.__getitems__(list(range(400)))
    assert images.shape == (400, 3, 16, 16) and moments.shape == (400, 6, 16, 16)
    assert set(labels.tolist()) == set(range(10)) and len(data.class_names) == 10
    torch.testing.assert_close(moments[:, :3], images.float() / 127.5 - 1)
    assert moments[:, 3:].abs().sum() == 0
    # the shape is one flat light colour (each channel 0.55-1), the background dark (0-0.35, and
    # a gradient of 0.05): no pixel's brightness lies between, and the light pixels of an image
    # are all of one colour (a dark shape on a light gradient would fail both)
    brightness = images.float().mean(1) / 255
    assert not ((brightness > 0.41) & (brightness < 0.54)).any()
    fg = brightness > 0.5
    assert fg.any((1, 2)).all() and (~fg).any((1, 2)).all()
    for image, mask in zip(images, fg):
        assert len(image[:, mask].unique(dim=1).T) == 1
    # the shape is the class: the share of the foreground differs between the classes (a bar
    # covers far less than a square of the same size) ...
    per_class = torch.stack([fg.float().mean((1, 2))[labels == c].mean() for c in range(10)])
    assert per_class.max() > 2 * per_class.min()
    # ... the rest varies within a class: colour, background (a disk's mean colour varies) ...
    disks = labels == 0
    assert images[disks].float().mean((2, 3)).std(0).min() > 10
    # ... but the shape is near the centre: within the 1-pixel jitter and the pixel grid
    rows = torch.arange(16.0) + 0.5
    centre_y = (fg[disks] * rows[:, None]).sum((1, 2)) / fg[disks].sum((1, 2))
    assert (centre_y - 8).abs().max() < 1.5 and centre_y.std() > 0.3
    # ... and turned by at most `turn` either way: a bar's long axis (from its second moments)
    # lies within 0.5 radians of the horizontal, up to the pixel grid, and uses that whole range
    bars = fg[labels == 6]
    axis = long_axis(bars)
    assert len(bars) > 20
    assert axis.abs().max() < 0.5 + 0.12 and axis.abs().max() > 0.5 - 0.12


def test_simclr_views_keep_the_shape_and_change_the_rest():
    data = demo.DemoDataset(64, seed=3)
    g = torch.Generator().manual_seed(0)
    views = [demo.simclr_view(data.images, g) for _ in range(2)]
    assert views[0].shape == (64, 3, 16, 16) and 0 <= views[0].min() and views[0].max() <= 1
    assert (views[0] - views[1]).abs().mean() > 0.1  # two views of one image differ
    # the shape survives: the share of pixels on the minority side of the image's mean brightness
    # (the shape, or for big shapes the background) is kept within the scaling's range
    share = lambda x: (x.mean(1) > x.mean((1, 2, 3))[:, None, None]).float().mean((1, 2))
    original = share(data.images / 255)
    for v in views:
        ratio = torch.minimum(share(v), 1 - share(v)) / torch.minimum(original, 1 - original)
        assert 0.4 < ratio.median() < 1.6
    # turned by at most the demo's 0.5 radians (and flipped): a bar's long axis, from the second
    # moments of the image's minority side, moves by up to 0.5, so stays within 1.0 of the
    # horizontal where the data's is within 0.5 (turned by any angle: up to pi / 2)
    def axis(x):
        bright = x.float().mean(1)
        side = bright > bright.mean((1, 2), keepdim=True)
        return long_axis(torch.where(side.float().mean((1, 2), keepdim=True) > 0.5, ~side, side))
    data = demo.DemoDataset(2000, seed=3)
    bars = data.images[data.labels == 6]
    before, after = axis(bars), axis(demo.simclr_view(bars, g))
    assert len(bars) > 100 and before.abs().max() < 0.6
    assert after.abs().max() < 1.0 + 0.15
    moved = torch.minimum((after - before).abs(), (after + before).abs())  # flipped or not
    assert moved.max() > 0.35


def test_the_demo_networks_are_made_once_and_cached(tmp_path, monkeypatch, demo_cache):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path))
    calls = []
    def make():
        calls.append(1)
        return torch.nn.Linear(2, 3), {"probe": 0.5}
    first, again = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    info = demo.cache_once("net.pt", make, first)
    assert demo.cache_once("net.pt", make, again) == info  # loaded, not made again
    # kept in a folder for the version of the images, so that a change of the images remakes them
    folder = tmp_path / f"shapes-v{demo.DemoDataset.version}"
    assert calls == [1] and os.listdir(tmp_path) == [folder.name]
    assert os.listdir(folder) == ["net.pt"]
    assert info["probe"] == 0.5 and "seconds" in info
    torch.testing.assert_close(first.state_dict(), again.state_dict())
    # a file from another recipe of the demo: one clear line, and the file is kept
    with pytest.raises(repa.UserError, match="another recipe of the demo: delete it"):
        demo.cache_once("net.pt", make, torch.nn.Linear(2, 4))
    # the test run's encoder and judge: loaded from the cache, frozen, 64 tokens of 96
    monkeypatch.setenv("REPA_CACHE", demo_cache)
    (enc,), (judge, info) = demo.demo_encoders(), demo.demo_judge()
    assert enc.tokens == 64 and enc.dim == 96 and not enc.model.training
    # its tokens are standardized in each channel over (the first 2,000 of) the images it
    # pretrains on, so the alignment target is not one shared direction
    with torch.no_grad():
        images = demo.DemoDataset(20_000, seed=100).images[:2000]
        tokens = enc.model.forward_features(images / 255)
    torch.testing.assert_close(tokens.mean((0, 1)), torch.zeros(96), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens.std((0, 1)), torch.ones(96), atol=1e-4, rtol=0)
    z = torch.nn.functional.normalize(tokens.flatten(0, 1), dim=-1)
    assert z.mean(0).square().sum() < 0.05  # the mean cosine of two tokens (before: 0.73)
    assert not any(p.requires_grad for p in [*enc.model.parameters(), *judge.parameters()])
    assert judge(torch.zeros(5, 3, 16, 16)).shape == (5, 10)  # logits of x / 255
    assert judge.body(torch.zeros(5, 3, 16, 16)).shape == (5, 128)  # FD_demo's features


def test_help_lists_the_demos_flags_then_trainings_with_the_demos_defaults(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    own, training = out.split("options:")[1].split("training: repa.py's flags, with the demo's "
                                                  "defaults")
    assert "--compare" in own and "--lr" not in own
    assert "--lr LR AdamW, constant, no warm-up (default 0.002)" in training
    assert "--data-dir" not in training and "--enc-type" not in training  # the demo's own
    cfg, compare, measure = demo.parse_args(["--max-steps", "7"])
    assert not compare and measure is None
    assert cfg.max_steps == 7 and cfg.batch_size == demo.DEMO["batch_size"]
    assert cfg.enc_type == demo.DEMO_ENCODER  # recorded in config.json and checkpoints
    # --analyze: tools/analyze.py's flags, with the demo's target and its shared training flags
    _, _, measure = demo.parse_args(["--analyze", "x.pt", "--seed", "3", "--probe-lr", "0.1"])
    assert (measure.ckpt, measure.seed, measure.probe_lr) == ("x.pt", 3, 0.1)
    assert measure.enc_type == demo.DEMO_ENCODER and measure.analyze_images == 2000


@pytest.mark.parametrize("flags,message", [
    (["--data-dir", "x"], "unrecognized arguments: --data-dir"),
    (["--compare", "--proj-coeff", "0"], "--compare's two recipes are the same run"),
    (["--compare", "--max-steps", "20"], "it needs one --align-every from 1 to --max-steps"),
    (["--compare", "REPA=", "a=--max-steps 500"], "and one --max-steps"),
    (["--compare", "REPA="], "--compare takes two recipes NAME=FLAGS"),
    (["--compare", "REPA=", "--lr 1"], "--compare takes two recipes NAME=FLAGS"),
    (["--compare", "REPA=", "x=--lr fast"], "argument --lr: invalid float value: 'fast'"),
    (["--compare", "REPA=", "x=--spatial-norm 2"], "--spatial-norm must be in [0, 1], got 2.0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0")])
def test_bad_flags_are_one_clear_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


def test_compare_recipes_are_flags_on_top_of_the_command():
    cfg = demo.parse_args(["--lr", "0.001", "--exp-name", "cmp"])[0]
    runs = demo.recipes(cfg, ["REPA=", "iREPA=--projector conv --spatial-norm 0.6 --lr 0.003"])
    assert list(runs) == ["REPA", "iREPA"]
    assert runs["REPA"] == replace(cfg, exp_name=os.path.join("cmp", "repa"))
    assert runs["iREPA"] == replace(cfg, projector="conv", spatial_norm=0.6, lr=0.003,
                                    exp_name=os.path.join("cmp", "irepa"))
    assert runs["iREPA"].enc_type == demo.DEMO_ENCODER  # the demo's own fields stay
    assert list(demo.recipes(cfg, demo.VERSUS).values())[0].proj_coeff == 0


def test_progress_reads_the_last_whole_log_row(tmp_path):
    # --compare's progress line: a run's step and images/s from its metrics.jsonl, whose last
    # line may be half written while the parent reads it
    assert demo.progress(tmp_path) == (0, None)
    rows = [{"step": 25, "loss": 0.9, "img_s": 60.0}, {"step": 25, "fd_demo": 9.0},
            {"step": 50, "loss": 0.8, "img_s": 70.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 75, "lo')
    assert demo.progress(tmp_path) == (50, 70.5)


@pytest.mark.slow
def test_demo_trains_and_both_losses_fall(tmp_path):
    cache = tmp_path / "cache"  # its own: the real encoder and judge are pretrained here
    steps = 500  # half the demo's steps, to keep CI short; the run is the demo's until then
    out = run_demo("--max-steps", str(steps), "--results-dir", str(tmp_path),
                   env={"REPA_CACHE": str(cache)}, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pretrained on the shapes without labels" in out.stdout  # what it aligns to
    made = cache / f"shapes-v{demo.DemoDataset.version}"
    encoder = torch.load(made / "demo-simclr-vit.pt", weights_only=True)["info"]
    judge = torch.load(made / "demo-judge.pt", weights_only=True)["info"]
    assert encoder["probe"] > 0.5 and judge["accuracy"] > 0.9  # measured 0.88, 1.0; chance 0.1
    rows = [json.loads(l) for l in open(tmp_path / "demo" / "metrics.jsonl")]
    every = demo.DEMO["align_every"]  # and its measurements (--align-every) in the same file
    scores = [r for r in rows if "fd_demo" in r]
    assert [r["step"] for r in scores] == list(range(every, steps + 1, every))
    assert scores[-1]["fd_demo"] < 0.5 * scores[0]["fd_demo"]
    # aligned: at step 500, 0.097 / 0.120 / 0.112 at block 2 for seeds 0 / 1 / 2 (vanilla runs
    # of the same seeds: 0.056 / 0.043 / 0.056)
    assert scores[-1]["cknna/demo-simclr-vit/block2"] > 0.075
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]
    assert last["step"] == steps
    assert last["loss"] < 0.8 * first["loss"] and last["align"] < first["align"] - 0.05
    assert os.path.isfile(tmp_path / "demo" / "checkpoints" / f"{last['step']:07d}.pt")
    # and its samples: a grid on the CPU in under a minute
    grid = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--ckpt",
                           str(tmp_path / "demo")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "REPA_CACHE": str(cache)})
    assert grid.returncode == 0, grid.stderr[-2000:]
    assert any(f.endswith("-grid.png") for f in os.listdir(tmp_path / "demo" / "samples"))


@pytest.mark.slow
def test_compare_trains_both_from_the_same_start_and_reports(tmp_path, capsys):
    demo.main(["--compare", "--results-dir", str(tmp_path), "--max-steps", "2",
               "--batch-size", "8", "--log-every", "1", "--align-every", "1", "--align-images",
               "40", "--sample-every", "2", "--ckpt-every", "2"])
    rows = {name: [json.loads(l) for l in open(tmp_path / "demo" / name / "metrics.jsonl")]
            for name in ("vanilla", "repa")}
    losses = {name: [r for r in r_ if "loss" in r] for name, r_ in rows.items()}
    # the same weights, data and noise: the first step's losses are equal; at the second, REPA
    # is the better aligned, since only its first update followed the alignment term
    assert losses["vanilla"][0]["loss"] == losses["repa"][0]["loss"]
    assert losses["vanilla"][0]["align"] == losses["repa"][0]["align"]
    assert losses["repa"][1]["align"] < losses["vanilla"][1]["align"] - 0.01
    for name in rows:
        config = json.load(open(tmp_path / "demo" / name / "config.json"))["config"]
        assert config["proj_coeff"] == (0.0 if name == "vanilla" else repa.Config.proj_coeff)
        scores = [r for r in rows[name] if "fd_demo" in r]
        assert [r["step"] for r in scores] == [1, 2]
        assert {"class_acc", "probe/block2", "cknna/demo-simclr-vit/block2"} <= set(scores[0])
    report = open(tmp_path / "demo" / "compare.md").read()
    assert report.count("\n| 1 | ") == 1 and report.count("\n| 2 | ") == 1
    assert all(row.count("|") == 11 for row in report.splitlines() if row.startswith("| "))
    assert "vanilla's final FD_demo" in report and "REPA" in capsys.readouterr().out
    assert "times REPA's, and vanilla's" in report
    assert f"at lr {demo.DEMO['lr']:g} (both runs)" in report
    assert os.path.getsize(tmp_path / "demo" / "compare.png") > 10_000
    # run again: nothing is trained, the report is written again (a grid that sample.py put
    # next to the training's grids of one run is not one of them)
    samples = tmp_path / "demo" / "repa" / "samples"
    (samples / "0000002-ode-heun-grid.png").write_bytes((samples / "0000002.png").read_bytes())
    before = os.path.getmtime(tmp_path / "demo" / "repa" / "checkpoints" / "0000002.pt")
    demo.main(["--compare", "--results-dir", str(tmp_path), "--max-steps", "2",
               "--batch-size", "8", "--align-every", "1", "--align-images", "40"])
    assert os.path.getmtime(tmp_path / "demo" / "repa" / "checkpoints" / "0000002.pt") == before


@pytest.mark.slow
def test_compare_runs_any_two_recipes_from_the_same_start(tmp_path):
    demo.main(["--compare", "REPA=", "HASTE=--align-until 1", "--results-dir", str(tmp_path),
               "--max-steps", "2", "--batch-size", "8", "--log-every", "1", "--align-every", "1",
               "--align-images", "40", "--sample-every", "0"])
    rows = {name: [json.loads(l) for l in open(tmp_path / "demo" / name / "metrics.jsonl")
                   if '"loss"' in l] for name in ("repa", "haste")}
    assert rows["repa"][0]["loss"] == rows["haste"][0]["loss"]  # one start, one step alike
    assert rows["repa"][1]["align"] < 0 and rows["haste"][1]["align"] == 0  # then HASTE stops
    report = open(tmp_path / "demo" / "compare.md").read()
    assert "REPA: the command's flags; HASTE: --align-until 1." in report
    assert "| step | fd_demo REPA | fd_demo HASTE |" in report


@pytest.mark.slow
def test_compare_side_by_side_passes_sigterm_on_and_resumes(tmp_path):
    # --compare trains its two runs in child processes: a SIGTERM to the command reaches both
    # (once), each saves latest.pt and stops, no report is written; the same command resumes
    import signal
    import time
    args = [sys.executable, DEMO_PY, "--batch-size", "16", "--log-every", "1", "--sample-every",
            "0", "--compare", "--max-steps", "400", "--align-every", "400", "--results-dir",
            str(tmp_path)]
    proc = subprocess.Popen(args, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while min(demo.progress(tmp_path / "demo" / name)[0] for name in ("vanilla", "repa")) < 3:
        assert time.time() < deadline and proc.poll() is None  # until both are really training
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal; both runs saved" in out
    checkpoint = lambda name, file: repa.load_checkpoint(
        str(tmp_path / "demo" / name / "checkpoints" / file))
    saved = [checkpoint(name, "latest.pt")["steps"] for name in ("vanilla", "repa")]
    assert all(3 <= n < 400 for n in saved), saved
    assert not (tmp_path / "demo" / "compare.md").exists()
    for name, n in zip(("vanilla", "repa"), saved):
        log = open(tmp_path / "demo" / name / "train.log").read()
        assert f"stopped by signal at step {n}" in log
    end = str(max(saved) + 2)  # resumed by the same command, with a nearer end to save time
    rest = subprocess.run(args + ["--max-steps", end, "--align-every", end], cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr[-2000:]
    for name in ("vanilla", "repa"):
        assert "resumed from" in open(tmp_path / "demo" / name / "train.log").read()
        assert checkpoint(name, f"{int(end):07d}.pt")["steps"] == int(end)
    assert (tmp_path / "demo" / "compare.md").exists()
