"""Tests for tools/prepare.py: ImageNet-style folders to shards (resumable, refused when mixed),
and the reader's benchmark."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare
import repa
from test_evaluate import adm_center_crop
from test_repa import HERE, image_folder, tiny_vae


def run_prepare(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "tools", "prepare.py"), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout, cwd=HERE)


def test_prepare_resumes_after_a_stop_and_reads_back(tmp_path, monkeypatch):
    from PIL import Image
    src, out, vae = image_folder(tmp_path / "src"), tmp_path / "out", tiny_vae(tmp_path / "vae")
    cfg = lambda **kw: prepare.PrepareConfig(**{"data_dir": str(out), "resolution": 16, "vae": vae,
                                                **kw})
    real_write, calls = prepare.write_shard, []

    def crash_on_third(out_dir, k, *args, **kw):  # a stop in the middle of writing shard 3
        calls.append(k)
        if len(calls) == 3:
            os.makedirs(os.path.join(out_dir, f".shard-{k:05d}.tmp999"))
            raise KeyboardInterrupt
        real_write(out_dir, k, *args, **kw)

    monkeypatch.setattr(prepare, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(src), cfg(shard_size=2))
    assert sorted(d for d in os.listdir(out) if d.startswith("shard-")) == ["shard-00000",
                                                                            "shard-00001"]
    monkeypatch.setattr(prepare, "write_shard", real_write)
    written = []
    monkeypatch.setattr(prepare, "write_shard", lambda o, k, *a, **kw: (written.append(k),
                                                                     real_write(o, k, *a, **kw)))
    prepare.prepare(str(src), cfg(shard_size=2))
    assert written == [2, 3, 4]  # only the shards that were not whole are redone
    assert not [d for d in os.listdir(out) if d.startswith(".shard-")]  # the half-written one
    # resumed with another shard size, resolution or source, it would mix or lose images
    for change, says in [(dict(shard_size=3), "shard_size 2 -> 3"),
                         (dict(resolution=32), "resolution 16 -> 32")]:
        with pytest.raises(repa.UserError, match=f"is prepared otherwise .*{says}"):
            prepare.prepare(str(src), cfg(**{"shard_size": 2, **change}))

    data = repa.ShardDataset(str(out))
    assert len(data) == 9 and data.num_classes == 3  # 10 files, one corrupt
    manifest = json.load(open(out / "manifest.json"))
    assert len(manifest["failed"]) == 1 and "broken.JPEG" in manifest["failed"][0]
    images, moments, labels = data.__getitems__(list(range(9)))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert images.dtype == torch.uint8 and images.shape == (9, 3, 16, 16)
    assert moments.shape == (9, 8, 8, 8)  # the tiny VAE downsamples by 2
    # each stored image is the ADM crop of its file, and its moments are the VAE posterior's
    files = sorted((src / "n00000001").glob("img*"))
    first = adm_center_crop(Image.open(files[0]).convert("RGB"), 16)
    assert np.array_equal(images[3].permute(1, 2, 0).numpy(), first)
    with torch.no_grad():
        post = repa.load_vae(vae).encode(images[3:4].float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(moments[3:4], torch.cat([post.mean, post.std], 1))



def test_prepare_from_the_command_line(tmp_path):
    src, vae = image_folder(tmp_path / "src"), tiny_vae(tmp_path / "vae")
    args = [str(src), "--data-dir", str(tmp_path / "o"), "--vae", vae, "--resolution", "16",
            "--shard-size", "3"]
    out = run_prepare(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "prepared 9 images in 4 shards" in out.stdout and "broken.JPEG" in out.stdout
    assert len(repa.ShardDataset(str(tmp_path / "o"))) == 9
    # a second run on the finished folder changes nothing (no file is written) and says so
    files = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("*")}
    again = run_prepare(*args)
    assert again.returncode == 0 and "is prepared already, nothing to do: 9 images" in again.stdout
    assert {str(p): p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("*")} == files


def test_prepare_errors_are_one_line_and_keep_what_was_written(tmp_path):
    out = run_prepare(str(tmp_path / "missing"), "--data-dir", str(tmp_path / "o"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "source folder not found" in out.stderr
    src = image_folder(tmp_path / "src")
    os.makedirs(src / "n00000009")
    out = run_prepare(str(src), "--data-dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "hold no images" in out.stderr and "\n" not in out.stderr.strip()
    os.rmdir(src / "n00000009")
    # no VAE offline: nothing is written, not even the output folder
    out = run_prepare(str(src), "--data-dir", str(tmp_path / "o"),
                   env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and out.stderr.startswith("error: cannot load the VAE")
    assert out.stderr.strip().count("\n") == 0 and not os.path.exists(tmp_path / "o")
    # shards that no preparation began (--bench-data's random ones, say) are not adopted
    done = tmp_path / "o" / "shard-00007"
    os.makedirs(done)
    (done / "labels.npy").write_bytes(b"kept")
    out = run_prepare(str(src), "--data-dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "holds shards that no tools/prepare.py began" in out.stderr
    assert (done / "labels.npy").read_bytes() == b"kept"



def test_reader_benchmark_prints_samples_per_second(tmp_path):
    out = run_prepare("--bench-data", "600", "--data-dir", str(tmp_path / "d"), "--resolution",
                      "64", "--batch-size", "50", "--num-workers", "1")
    assert out.returncode == 0, out.stderr
    assert "samples/s" in out.stdout and float(out.stdout.split()[1]) > 0



def test_reader_benchmark_never_fills_a_folder_that_has_data(tmp_path):
    (tmp_path / "half_prepared").mkdir()
    (tmp_path / "half_prepared" / "shard-00000").mkdir()
    out = run_prepare("--bench-data", "10", "--data-dir", str(tmp_path / "half_prepared"))
    assert out.returncode == 2 and "no prepared dataset" in out.stderr
    assert os.listdir(tmp_path / "half_prepared") == ["shard-00000"]


@pytest.mark.parametrize("flags,message", [
    ([], "give a source folder to prepare, or --bench-data N"),
    (["src", "--bench-data", "10"], "(one of them)"),
    (["src", "--resolution", "100"], "--resolution must be a multiple of 8, got 100"),
    (["src", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["src", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["src", "--prepare", "x"], "unrecognized arguments: --prepare")])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
