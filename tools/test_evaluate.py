"""Tests for tools/evaluate.py (ADM's suite: FID, sFID, IS, precision/recall), run in-process
and through sample.py's --fid-ref and --evaluate."""
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate
import sample
from test_repa import image_folder, run_cli, save_ours


def adm_center_crop(pil_image, image_size):
    """The ADM definition (guided-diffusion image_datasets.py), written out as the reference."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def test_center_crop_equals_adm_on_odd_sized_image():
    from PIL import Image
    rng = np.random.default_rng(0)
    for w, h in [(1023, 517), (517, 1023), (257, 301)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = evaluate.center_crop_adm(img, 256)
        assert ours.shape == (256, 256, 3)
        assert np.array_equal(ours, adm_center_crop(img, 256))


# =============================================================================================
# ADM's FID, sFID, IS, precision/recall, in-process
#   1. The Fréchet distance equals its closed form for diagonal covariances and an independent
#      eigendecomposition on random ones, rank-deficient included; ADM's retry with eps.
#   2. The Inception Score of hand-made logits: 1, the number of classes per chunk, a hand
#      computation, and ADM's chunks of 5,000 for 50,000 samples.
#   3. Precision/recall: a hand-checked line of points (the ball's edge counts), ADM's brute
#      force at any block size, the float32 fallback, and the numbers of ADM's own TF code.
#   4. The network's input is TF's bilinear resize bit for bit; the three features are the
#      layers ADM reads (spatial in TF's H, W, C order); reference folders are ADM crops.
#   5. End to end on a random Inception of the real architecture: a sampling run without the
#      weights keeps its .npz and says how to get them (exit 2); --evaluate then prints the
#      line and writes the JSON, with numbers computed independently; bad inputs are one line.
# =============================================================================================
def fd_by_eigenvalues(mu1, s1, mu2, s2):
    """tr((S1 S2)^(1/2)) as the sum of the square roots of the eigenvalues of the symmetric PSD
    S1^(1/2) S2 S1^(1/2), which has the eigenvalues of S1 S2: no sqrtm involved."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root @ s2 @ root)
    return (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
            - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # diagonal: (S1 S2)^(1/2) = diag(sqrt(a b)), so FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 3, 5), \
        rng.uniform(0.1, 3, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want,
                                                                                      rel=1e-12)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("dim,n1,n2", [(16, 40, 40), (64, 200, 100), (32, 5, 9), (50, 10, 10)])
def test_frechet_distance_equals_eigendecomposition(dim, n1, n2):
    # n < dim: rank-deficient covariances (few samples; sFID's 2023 dims), where sqrtm returns
    # complex roots with tiny imaginary parts that must be dropped, not kept
    rng = np.random.default_rng(dim + n1)
    x = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    y = rng.normal(size=(n2, dim)) + 0.5
    (mu1, s1), (mu2, s2) = evaluate.gaussian_statistics(x), evaluate.gaussian_statistics(y)
    centred = x - x.mean(0)
    np.testing.assert_allclose(s1, centred.T @ centred / (n1 - 1))  # the unbiased covariance
    got = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(fd_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-6,
                                abs=1e-9 * np.trace(s1 + s2))


def test_frechet_distance_retries_a_non_finite_root_with_eps(monkeypatch):
    import scipy.linalg
    real_sqrtm, products = scipy.linalg.sqrtm, []

    def failing_once(a):  # what scipy gives for some singular products
        products.append(a)
        return np.full_like(a, np.nan) if len(products) == 1 else real_sqrtm(a)
    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    s1, s2, eps = np.diag([1.0, 0.0]), np.diag([0.0, 4.0]), 1e-6
    got = evaluate.frechet_distance(np.zeros(2), s1, np.ones(2), s2, eps)
    np.testing.assert_allclose(products[1], (s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2)))
    # the traces stay those of the given covariances (ADM): 2 + 1 + 4 - 2 tr(root)
    root = np.sqrt((1 + eps) * eps) + np.sqrt(eps * (4 + eps))
    assert got == pytest.approx(2 + 1 + 4 - 2 * root, rel=1e-12)


def test_inception_score_of_hand_made_logits():
    assert evaluate.inception_score(np.zeros((40, 1008))) == pytest.approx(1, abs=1e-12)  # p(y|x)=p(y)
    # sure predictions (logit 50), classes 0..9 twice in order: IS = the number of classes a
    # chunk sees, since then KL = log(that number) for every row
    sure = np.tile(np.eye(10) * 50, (2, 1))
    assert evaluate.inception_score(sure) == pytest.approx(10, rel=1e-9)  # one chunk of 20
    assert evaluate.inception_score(sure, chunk=2) == pytest.approx(2, rel=1e-9)  # 10 chunks
    # chunks of 8, 8, 4: each sees 8, 8, 4 classes
    assert evaluate.inception_score(sure, chunk=8) == pytest.approx(20 / 3, rel=1e-9)
    # two soft predictions: p(y) = (1/2, 1/2), KL = 0.9 ln 1.8 + 0.1 ln 0.2 for both
    soft = np.log([[0.9, 0.1], [0.1, 0.9]])
    assert evaluate.inception_score(soft) == pytest.approx(
        math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2)), rel=1e-12)


@pytest.mark.parametrize("n", [50_000, 12_000])  # ADM's 10 chunks; and 5,000, 5,000, 2,000
def test_inception_score_uses_adms_chunks_of_5000(n):
    logits = np.random.default_rng(0).normal(scale=3, size=(n, 6)).astype(np.float32)
    preds = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []  # ADM's compute_inception_score, written out (split_size 5000)
    for i in range(0, len(preds), 5000):
        part = preds[i:i + 5000]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert evaluate.inception_score(logits) == pytest.approx(float(np.mean(scores)), rel=1e-5)


def on_a_line(xs):
    """Points of pool_3's width, placed along the first axis."""
    points = torch.zeros(len(xs), 2048)
    points[:, 0] = torch.tensor(xs, dtype=torch.float32)
    return points


def adm_precision_recall(real, fake, k=3):
    """ADM's ManifoldEstimator written out in float32 for small sets: k-th neighbour radii from
    the full distance matrix (self included), then `<=` against every ball."""
    d2 = lambda u, v: np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1), 0)
    radii_real = np.partition(d2(real, real), k, axis=1)[:, k]
    radii_fake = np.partition(d2(fake, fake), k, axis=1)[:, k]
    d = d2(real, fake)
    return (d <= radii_real[:, None]).any(0).mean(), (d <= radii_fake[None, :]).any(1).mean()


def test_precision_recall_by_hand_on_a_line():
    # real at 0, 1, 2, 3: squared distance to the 3rd neighbour 9, 4, 4, 9, so the real balls
    # cover [-3, 6]; fake at 5, 6, 7, 8 likewise cover [2, 11]. precision: fakes 5 and 6 (on the
    # edge: |6 - 3|^2 = 9 <= 9) are covered, 7 and 8 not; recall: reals 2 (edge) and 3 -> 1/2
    real, fake = on_a_line([0, 1, 2, 3]), on_a_line([5, 6, 7, 8])
    assert evaluate.manifold_radii(real).tolist() == [9, 4, 4, 9]
    assert evaluate.precision_recall(real, fake) == (0.5, 0.5)
    assert evaluate.precision_recall(real, fake, block=3) == (0.5, 0.5)
    # fake at 4..9: balls of 9, 4, 4, 4, 4, 9 cover [1, 12]: precision 3/6 (4, 5, 6), recall 3/4
    assert evaluate.precision_recall(real, on_a_line([4, 5, 6, 7, 8, 9])) == (0.5, 0.75)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32))
    assert evaluate.precision_recall(x, x + 100) == (0.0, 0.0)


def test_precision_recall_equals_adm_brute_force_at_any_block_size():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(120, 32)).astype(np.float32)
    fake = (rng.normal(size=(90, 32)) * 1.3 + 0.3).astype(np.float32)
    want = adm_precision_recall(real, fake)
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    for block in (17, 10_000):  # float16 distances move only points on a ball's edge
        assert evaluate.precision_recall(real, fake, block=block) == pytest.approx(want, abs=0.02)
    # float16 overflows beyond 65504 (|u|^2 = 360000 here): then float32, as ADM
    u = torch.full((2, 4), 300.0)
    assert evaluate._squared_distances(u, u / 2)[0, 0].item() == 90_000


# ADM's own ManifoldEstimator (guided-diffusion evaluator.py on TensorFlow 2.21, CPU) on
# seeded clouds like pool_3 features (non-negative, |x|^2 ~ 380 in 2048 dims). TF's CPU kernels
# round the float16 norms differently from its GPU ones (we round like the GPU), so distances
# can differ by one float16 step: on a 300 x 200 cloud ADM-on-CPU gives precision 0.235 and we
# 0.23; on these three sets the numbers agree exactly.
@pytest.mark.parametrize("seed,n_real,n_fake,dim,scale,adm", [
    (0, 60, 50, 2048, 1.0, (0.42, 1 / 3)), (1, 80, 40, 2048, 1.01, (0.25, 0.4875)),
    (2, 50, 70, 64, 1.05, (39 / 70, 0.78))])
def test_precision_recall_equals_adms_tf_code(seed, n_real, n_fake, dim, scale, adm):
    rng = np.random.default_rng(seed)
    real = rng.gamma(0.5, 0.5, size=(n_real, dim)).astype(np.float32)
    fake = (rng.gamma(0.5, 0.5, size=(n_fake, dim)) * scale).astype(np.float32)
    assert evaluate.precision_recall(torch.from_numpy(real), torch.from_numpy(fake)) == \
        pytest.approx(adm, abs=1e-12)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A weights file for torch-fidelity's FID Inception, the real architecture with random
    weights (the real ones are a download): He-initialised convolutions keep the activations
    of order 1 through the 94 layers, and the classifier gets a visible bias."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    with torch.random.fork_rng(), pytest.MonkeyPatch.context() as mp:
        torch.manual_seed(0)
        mp.setattr(torch, "load", lambda *args, **kwargs: {})  # build it without a file
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "none")
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        torch.nn.init.normal_(net.fc.bias)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_features_are_adms_layers_after_tfs_resize(random_inception):
    net = evaluate.InceptionFeatures(random_inception)
    seen = {}
    net.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.update(input=args[0]))
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.update(mixed_6=out))
    net.net.Mixed_7c.register_forward_hook(lambda m, i, out: seen.update(mixed_10=out))
    images = ((np.arange(2 * 24 * 20 * 3) * 7919) % 256).astype(np.uint8).reshape(2, 24, 20, 3)
    pool, spatial, logits = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    # the first convolution sees TF's ResizeBilinear to 299 (align_corners and half-pixel centres
    # off, as in the 2015 graph), then (x - 128) / 128: sha256 of TF 2.21's float32 output
    assert hashlib.sha256(seen["input"].numpy().tobytes()).hexdigest() == \
        "8b1890cdcdc0f39330092a6446f0189348e9d5e53aa4801a360862d900e55641"
    torch.testing.assert_close(pool, seen["mixed_10"].mean((2, 3)))  # pool_3: the average pool
    torch.testing.assert_close(logits, pool @ net.net.fc.weight.T)  # the softmax's input: no bias
    assert spatial.shape == (2, 17 * 17 * 7)
    for h, w, c in [(0, 0, 0), (0, 0, 6), (0, 1, 0), (1, 0, 3), (16, 9, 5)]:  # TF's NHWC order
        assert spatial[1, (h * 17 + w) * 7 + c] == seen["mixed_6"][1, c, h, w]


def test_images_are_read_from_npz_rows_and_as_adm_crops_from_folders(tmp_path, capsys):
    from PIL import Image
    arr = np.random.default_rng(0).integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=arr)  # a rank reads rows 2..6 in batches of 2
    count, batches = evaluate.image_source(str(tmp_path / "x.npz"))
    assert count == 7 and [b.shape[0] for b in batches(2, 7, 2)] == [2, 2, 1]
    assert torch.equal(torch.cat(list(batches(2, 7, 2))), torch.from_numpy(arr[2:7]).permute(
        0, 3, 1, 2))
    root = image_folder(tmp_path / "ref")  # 9 images in 3 class folders, 1 corrupt file
    count, batches = evaluate.image_source(str(root), 16)
    images = torch.cat(list(batches(0, count, 4)))
    paths = sorted(str(p) for p in root.glob("*/*") if p.name != "broken.JPEG")
    assert count == 10 and images.shape == (9, 3, 16, 16)
    for image, path in zip(images, paths):
        assert np.array_equal(image.permute(1, 2, 0).numpy(),
                              adm_center_crop(Image.open(path).convert("RGB"), 16))
    assert "broken.JPEG" in capsys.readouterr().err


def test_evaluation_end_to_end(tmp_path, random_inception, monkeypatch, capsys):
    import scipy.linalg
    from PIL import Image
    # 1. sampling with a reference folder but no weights: a warning first, the .npz, then one
    #    error line that says how to get the weights and how to evaluate the kept samples
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(tmp_path / "folder")
    for i in range(4):
        Image.new("RGB", (20, 24), (60 * i, 0, 0)).save(tmp_path / "folder" / f"{i}.png")
    save_ours(tmp_path / "demo.pt", in_channels=3, input_size=16, patch_size=4)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "demo.pt"), "--num-fid-samples", "5", "--num-steps",
                     "2", "--fid-ref", str(tmp_path / "folder"), "--sample-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    (npz,) = tmp_path.glob("*.npz")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert e.value.code == 2 and f"warning: the FID Inception weights are not in {cache}" in out
    error = err.splitlines()[-1]  # after the progress bar
    assert error.startswith(f"error: the FID Inception weights are not in {cache}: download")
    assert evaluate.INCEPTION_URL in error and error.endswith(
        f"evaluate them with: python sample.py --evaluate {npz} --fid-ref {tmp_path / 'folder'}")
    # 2. --evaluate against a reference of 4 of the samples and 2 plain images, with stored
    #    statistics of a point mass (sigma = 0): FID = |mu - mu_ref|^2 + tr(sigma), and
    #    sqrtm(sigma sigma_ref) = sqrtm(0) = 0 (scipy's takes ~10 s at 2048 dims, so given here)
    fakes = np.load(npz)["arr_0"]
    plain = np.stack([np.zeros_like(fakes[0]), np.full_like(fakes[0], 255)])
    rng = np.random.default_rng(0)
    mu, mu_s = rng.normal(size=2048), rng.normal(size=2023)
    np.savez(tmp_path / "ref.npz", arr_0=np.concatenate([fakes[:4], plain]), mu=mu,
             sigma=np.zeros((2048, 2048)), mu_s=mu_s, sigma_s=np.zeros((2023, 2023)))

    def root_of_zero(a):
        assert not a.any()  # the stored sigma is used, not the one of the images
        return np.zeros_like(a)
    monkeypatch.setattr(scipy.linalg, "sqrtm", root_of_zero)
    features, extract = [], evaluate.inception_features  # (the features are tested above)
    monkeypatch.setattr(evaluate, "inception_features",
                        lambda *args: features.append(extract(*args)) or features[-1])
    sample.main(["--evaluate", str(npz), "--fid-ref", str(tmp_path / "ref.npz"), "--inception",
                 random_inception])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    got = json.loads((tmp_path / f"{npz.stem}-vs-ref.json").read_text())
    (fake_pool, fake_spatial, _), (real_pool, _, _) = features
    assert torch.equal(real_pool[:4], fake_pool[:4])  # in the files' order
    for key, f, m in (("fid", fake_pool, mu), ("sfid", fake_spatial, mu_s)):
        f = f.double().numpy()
        want = ((f.mean(0) - m) ** 2).sum() + np.trace(np.cov(f, rowvar=False))
        assert got[key] == pytest.approx(want, rel=1e-9)
    precision, recall = evaluate.precision_recall(real_pool, fake_pool)
    assert precision != recall and (got["precision"], got["recall"]) == (precision, recall)
    p = torch.softmax(features[0][2].double(), 1)  # the 5 samples' logits: one chunk
    kl = (p * (p.log() - p.mean(0).log())).sum(1).mean()
    assert got["inception_score"] == pytest.approx(kl.exp().item(), rel=1e-9)
    assert got["num_samples"] == 5 and got["num_reference_images"] == 6
    assert line.startswith(f"FID {got['fid']:.4f}  sFID {got['sfid']:.4f}  IS "
                           f"{got['inception_score']:.2f}  precision "
                           f"{precision:.4f}  recall {recall:.4f}  (5 samples vs ")


def test_evaluation_input_errors_are_one_line(tmp_path, capsys):
    samples, stats, small = (str(tmp_path / f) for f in ("samples.npz", "foo.npz", "ref8.npz"))
    np.savez(samples, arr_0=np.zeros((5, 16, 16, 3), np.uint8))
    np.savez(stats, foo=np.zeros(3))
    np.savez(small, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    (tmp_path / "text.npz").write_text("not an npz")
    floats, two, mu10 = (str(tmp_path / f) for f in ("f32.npz", "two.npz", "mu10.npz"))
    np.savez(floats, arr_0=np.zeros((5, 16, 16, 3), np.float32))
    np.savez(two, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    np.savez(mu10, mu=np.zeros(10), sigma=np.eye(10))
    for argv, message in [
            (["--evaluate", samples, "--fid-ref", floats], "are float32 (16, 16, 3), the samples "
                                                            "uint8 (16, 16, 3)"),
            (["--evaluate", samples, "--fid-ref", two], f"{two} holds 2 images; use at least 4"),
            (["--evaluate", samples, "--fid-ref", mu10], "mu is (10,), not (2048,)"),
            (["--evaluate", samples, "--fid-ref", stats],
             f"{stats} holds neither images (arr_0) nor statistics (mu, sigma); it has foo"),
            (["--evaluate", stats, "--fid-ref", samples], f"{stats} has no images"),
            (["--evaluate", samples, "--fid-ref", small], "the reference images in"),
            (["--evaluate", samples, "--fid-ref", str(tmp_path / "none")], "no such file"),
            (["--evaluate", samples, "--fid-ref", str(tmp_path)], "no images in this folder"),
            (["--evaluate", str(tmp_path / "text.npz"), "--fid-ref", samples], "cannot read"),
            (["--evaluate", samples], "--evaluate needs --fid-ref"),
            (["--ckpt", "c.pt", "--classes", "1,x"], "--classes must be class numbers"),
            (["--ckpt", "c.pt", "--fid-ref", samples], "--fid-ref evaluates the samples of")]:
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err


@pytest.mark.slow
def test_evaluation_on_two_processes_equals_one(tmp_path, random_inception):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (20, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (9, 16, 16, 3), np.uint8))
    args = ["--evaluate", str(tmp_path / "samples.npz"), "--fid-ref", str(tmp_path / "ref.npz"),
            "--inception", random_inception, "--per-proc-batch-size", "5"]
    results = []
    for nproc in (None, 2):  # the same batches of 5, so the same features, in the same order
        out = run_cli(args, nproc=nproc)
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads((tmp_path / "samples-vs-ref.json").read_text()))
    assert results[0] == results[1] and 1 < results[0]["inception_score"]


def test_the_command_line_equals_sample_py_evaluate(tmp_path, random_inception, monkeypatch,
                                                    capsys):
    import scipy.linalg  # its sqrtm of 2048 x 2048 takes ~10 s; the Frechet tests above check it
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, **kwargs: np.eye(len(a)))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), np.uint8))
    samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
    evaluate.main([samples, ref, "--inception", random_inception])
    ours = json.loads((tmp_path / "samples-vs-ref.json").read_text())
    sample.main(["--evaluate", samples, "--fid-ref", ref, "--inception", random_inception])
    assert json.loads((tmp_path / "samples-vs-ref.json").read_text()) == ours
    assert capsys.readouterr().out.count(f"FID {ours['fid']:.4f}  sFID") == 2
    with pytest.raises(SystemExit) as e:  # bad input: one line
        evaluate.main([samples, str(tmp_path / "none.npz")])
    assert e.value.code == 2 and capsys.readouterr().err == \
        f"error: --fid-ref {tmp_path / 'none.npz'}: no such file or folder\n"
