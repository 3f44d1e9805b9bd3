"""
ADM's evaluation suite in PyTorch: FID, sFID, Inception Score, precision and recall of an .npz of
samples against a reference (ADM's VIRTUAL_imagenet256_labeled.npz, any .npz of images or of
statistics, or a folder of images), on torch-fidelity's port of ADM's TensorFlow Inception.

  python tools/evaluate.py SAMPLES.npz VIRTUAL_imagenet256_labeled.npz
  torchrun --nproc_per_node=8 tools/evaluate.py SAMPLES.npz IMAGENET/val   # features over ranks

It imports nothing of this project, so it can be copied alone; sample.py calls it for --fid-ref
(the samples it has just written) and --evaluate. Writes <samples>-vs-<reference>.json.
"""
import argparse
import datetime
import json
import math
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the input (a file, a folder, the weights): one line on the command line."""


def processes():
    """(rank, world, device) under torchrun (the process group made here if nobody has), else
    (0, 1, the GPU or the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(hours=1))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    return int(os.environ.get("RANK", 0)), world, device


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file, then rename it over `path`: never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#################################################################################
#          Images: ADM's centre crop, ImageNet-style folders (also prepare's)     #
#################################################################################

def center_crop_adm(image, size):
    """ADM's centre crop (guided-diffusion, image_datasets.py), used by the official preprocessing:
    halve with a box filter while the short side is >= 2 * size (cheap antialiasing), resize the
    short side to `size` with bicubic, then crop the centre. PIL image -> uint8 (size, size, 3)."""
    from PIL import Image
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = ((s - size) // 2 for s in image.size)
    return np.asarray(image.crop((left, top, left + size, top + size)))


def image_files(folder):
    """The files of `folder` that PIL opens (by their extension), sorted."""
    from PIL import Image
    extensions = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    return sorted(f.path for f in os.scandir(folder)
                  if f.is_file() and os.path.splitext(f.name)[1].lower() in extensions)


def list_image_folder(src):
    """(paths, labels, classes) of an ImageNet-style folder: one sub-folder per class, sorted, so
    the labels are 0..999 in the usual synset order."""
    if not os.path.isdir(src):
        raise UserError(f"source folder not found: {src}")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir())
    if not classes:
        raise UserError(f"no class folders in {src}: expected one sub-folder per class")
    files = [image_files(os.path.join(src, name)) for name in classes]
    empty = [name for name, f in zip(classes, files) if not f]
    if empty:
        raise UserError(f"{len(empty)} class folder(s) in {src} hold no images (e.g. {empty[0]}): "
                        "remove them or add images, or the labels would shift")
    return [p for f in files for p in f], [c for c, f in enumerate(files) for _ in f], classes


def read_images(paths, resolution, bar=None):
    """(uint8 (N, 3, R, R) ADM crops, indices of the readable files, 'path: error' of the rest)."""
    from PIL import Image
    images, keep, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                images.append(center_crop_adm(im.convert("RGB"), resolution))
            keep.append(i)
        except Exception as e:  # truncated, corrupt, not an image: list it, go on
            failed.append(f"{path}: {type(e).__name__}")
        if bar:
            bar.update(1)
    images = np.array(images, np.uint8).reshape(-1, resolution, resolution, 3)
    return images.transpose(0, 3, 1, 2), keep, failed


#################################################################################
#            Evaluation: FID, sFID, IS, precision/recall (ADM's suite)          #
#################################################################################
# The paper's numbers come from ADM's evaluator (guided-diffusion, evaluations/evaluator.py) run
# over the .npz above, with TensorFlow's InceptionV3 graph of 2015-12-05. We run that network in
# PyTorch as torch-fidelity ports it: the same weights, and a resize to 299 x 299 that is TF1's
# ResizeBilinear bit for bit (pytorch-fid's F.interpolate is off by up to 32.7 / 255; README).
# The features, TF graph name -> torch-fidelity module:
#   pool_3:0                 the final average pool, (N, 2048): FID, precision/recall
#   softmax logits           pool_3 @ W without the bias ("logits_unbiased"), (N, 1008): IS
#   mixed_6/conv:0[..., :7]  Mixed_6d.branch1x1 (conv, BN, ReLU), its first 7 of 192 channels,
#                            flattened in TF's (H, W, C) order, (N, 17 * 17 * 7 = 2023): sFID
# TF's mixed, mixed_1, ..., mixed_10 are Mixed_5b, 5c, 5d, 6a, ..., 7c in order, so mixed_6 is
# Mixed_6d, and its first conv ("conv", not "tower/conv") is the 1 x 1 branch.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# looked up in torch.hub's cache, where torch-fidelity downloads it; pytorch-fid's conversion of
# the same graph (the same sha256 prefix, 6726825d) is taken under its own name too
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth",
                   "pt_inception-2015-12-05-6726825d.pth")
SPATIAL_CHANNELS = 7  # sFID keeps mixed_6/conv[..., :7] (ADM)
FEATURE_DIMS = (2048, 17 * 17 * SPATIAL_CHANNELS, 1008)  # pool_3, spatial, logits
PR_K = 3              # k of the k-NN balls of precision/recall (ADM's nhood_sizes)
PR_BLOCK = 10_000     # rows and columns of one block of distances (ADM's row/col batch size)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, as ADM's:

        FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    sigma1 sigma2 has the eigenvalues of the PSD sigma1^(1/2) sigma2 sigma1^(1/2): real, >= 0.
    With fewer samples than dimensions the product is (near-)singular, and scipy's sqrtm returns
    tiny imaginary parts, which ADM drops if those on the diagonal are below 1e-3; if the root is
    not finite at all, ADM retries with eps added to both diagonals. So do we."""
    import scipy.linalg  # called through the module, so a test can stand in for a 10 s sqrtm
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    with warnings.catch_warnings():  # "matrix is singular": the expected case just described
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(sigma1))
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"(sigma1 sigma2)^(1/2) is complex: imaginary parts up to "
                             f"{np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_statistics(features):
    """(mu, sigma) of features (N, D) in float64: the mean and the unbiased covariance (ADM's)."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits, chunk=5_000):
    """IS = exp(E_x KL(p(y|x) || p(y))) of Salimans et al. 2016, with p(y|x) = softmax(logits) and
    p(y) the mean prediction of each consecutive chunk of `chunk` samples (the last may be
    shorter); the score is the chunks' mean, as ADM's (split_size 5,000: 10 chunks for 50,000
    samples, 2 for 10,000). Smaller chunks give a lower score, so IS compares only at equal N.
    In float64 from log-softmax (ADM: float32 softmax, then log), so a p of 0 is no NaN."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in logp.split(chunk):
        log_py = torch.logsumexp(part, 0) - math.log(len(part))  # log of the chunk's p(y)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp())
    return torch.stack(scores).mean().item()


def _squared_distances(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) for all pairs (len(u), len(v)), as ADM's DistanceBlock: in
    float16 (ADM casts the features, so every op rounds to float16), or in float32 when that is
    not finite. Pool_3 features have |x|^2 of a few hundred, far below float16's 65504, so ADM's
    precision/recall run on float16 distances. We round where each TF op does, with products
    summed in float32 (as half-precision matmuls and sums accumulate on GPUs)."""
    half = lambda x: x.half().float()
    u16, v16 = half(u), half(v)
    nu, nv = half(half(u16 * u16).sum(1)), half(half(v16 * v16).sum(1))
    d = half(half(nu[:, None] - half(2 * half(u16 @ v16.T))) + nv).clamp_min(0)
    return d if torch.isfinite(d).all() else \
        ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)).clamp_min(0)


def manifold_radii(features, k=PR_K, block=PR_BLOCK):
    """Each point's squared distance to its k-th nearest neighbour in its own set: index k of its
    sorted distances, which start with the point itself (ADM). Streamed over blocks of columns,
    keeping the k + 1 smallest so far: memory of a block x block, not ADM's block x N."""
    radii = []
    for rows in features.split(block):
        nearest = rows.new_empty(len(rows), 0)
        for cols in features.split(block):
            nearest = torch.cat([nearest, _squared_distances(rows, cols)], 1)
            nearest = nearest.topk(min(k + 1, nearest.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(real, fake, k=PR_K, block=PR_BLOCK):
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's compute_prec_recall:
    precision = the share of fake points inside the ball of at least one real point, recall = the
    share of real points inside the ball of at least one fake point, where x is inside y's ball
    when |x - y|^2 <= (y's radius)^2 (manifold_radii; squared and `<=`, as ADM). Features are
    (N, D) float32 tensors on any device; 50K x 50K distances are never held at once."""
    radii_real, radii_fake = manifold_radii(real, k, block), manifold_radii(fake, k, block)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    for i in range(0, len(real), block):
        for j in range(0, len(fake), block):
            d = _squared_distances(real[i:i + block], fake[j:j + block])
            real_in[i:i + block] |= (d <= radii_fake[j:j + block]).any(1)
            fake_in[j:j + block] |= (d <= radii_real[i:i + block, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


def inception_weights(path=""):
    """The FID Inception weights: `path` if given, else the file in torch.hub's cache; None when
    there is none (the caller says how to get it)."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--inception {path}: file not found")
        return path
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return next((os.path.join(cache, f) for f in INCEPTION_FILES
                 if os.path.isfile(os.path.join(cache, f))), None)


def missing_inception():
    """The one line that says where the weights go and how to get them."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return (f"the FID Inception weights are not in {cache}: download them there with python -c "
            f"\"import torch; torch.hub.load_state_dict_from_url('{INCEPTION_URL}', "
            f"check_hash=True)\", or give a copy with --inception PATH")


class InceptionFeatures(torch.nn.Module):
    """ADM's three features of uint8 images (B, 3, H, W), in float32: pool_3 (B, 2048), the spatial
    mixed_6/conv (B, 2023) and the unbiased logits (B, 1008). The network is torch-fidelity's
    (resize, scaling and all); a hook keeps the one inner layer that sFID reads."""

    def __init__(self, weights):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:  # torch-fidelity reads the file unrestricted; a weights_only read first makes it safe
            torch.load(weights, map_location="cpu", weights_only=True)
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights)
        except Exception as e:
            raise UserError(f"{weights} is not the FID Inception's weights: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        self.kept = {}
        self.net.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, inputs, out: self.kept.update(spatial=out))

    @torch.no_grad()
    def forward(self, images):
        pool, logits = self.net(images)
        spatial = self.kept.pop("spatial")[:, :SPATIAL_CHANNELS]
        return pool, spatial.permute(0, 2, 3, 1).flatten(1), logits  # NHWC, as TF flattens it


def _npy_header(f):
    """(shape, dtype) from the header of the .npy stream `f`, which is left at row 0."""
    fmt = np.lib.format
    read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("an array is stored in Fortran order")
    return shape, dtype


def npz_arrays(path):
    """{name: (shape, dtype)} of an .npz from its headers alone."""
    try:
        with zipfile.ZipFile(path) as z:
            return {name.removesuffix(".npy"): _npy_header(z.open(name)) for name in z.namelist()}
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"cannot read {path} as an .npz: {e}") from None


def image_paths(folder):
    """The images of a folder: ImageNet-style (one sub-folder per class) or flat, sorted."""
    dirs = any(entry.is_dir() for entry in os.scandir(folder))
    return list_image_folder(folder)[0] if dirs else image_files(folder)


def image_source(path, size=None):
    """(count, batches) of the images of an .npz (arr_0) or of a folder, where
    batches(start, stop, batch) yields rows start..stop as uint8 (B, 3, H, W): a folder's as ADM
    crops to `size`, its unreadable files skipped and named; an .npz's streamed as ADM's reader
    does, a rank reading its share only, one batch at a time (50K images are 9.8 GB)."""
    if os.path.isdir(path):
        paths = image_paths(path)

        def batches(start, stop, batch):
            for i in range(start, stop, batch):
                images, _, failed = read_images(paths[i:min(i + batch, stop)], size)
                for line in failed:
                    print(f"skipped unreadable {line}", file=sys.stderr)
                yield torch.from_numpy(images)
        return len(paths), batches
    shape = npz_arrays(path)["arr_0"][0]
    row = math.prod(shape[1:])

    def batches(start, stop, batch):
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            _npy_header(f)
            f.seek(f.tell() + start * row)
            for i in range(start, stop, batch):
                n = min(batch, stop - i)
                chunk = np.frombuffer(f.read(n * row), np.uint8).reshape(n, *shape[1:])
                yield torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2)
    return shape[0], batches


def gather_rows(x):
    """Every rank's rows, in rank order (the file's order), on every rank. all_gather wants equal
    shapes, so each rank pads to the longest share and the padding is cut off again."""
    if not dist.is_initialized():
        return x
    counts = [0] * dist.get_world_size()
    dist.all_gather_object(counts, len(x))
    padded = torch.cat([x, x.new_zeros((max(counts) - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def inception_features(net, source, batch, device, desc):
    """(pool, spatial, logits) of all images of `source` (image_source); each rank computes a
    contiguous share and all gather them, so the rows keep the source's order (IS chunks)."""
    from tqdm import tqdm
    rank, world, _ = processes()
    count, batches = source
    start, stop = count * rank // world, count * (rank + 1) // world
    parts = [net(images.to(device)) for images in tqdm(
        batches(start, stop, batch), total=math.ceil((stop - start) / batch), unit="batch",
        desc=f"Inception features of the {desc}", disable=rank != 0)]
    return [gather_rows(torch.cat([p[i] for p in parts]) if parts else
                        torch.zeros(0, dim, device=device)) for i, dim in enumerate(FEATURE_DIMS)]


def check_evaluation(samples, reference, size=None):
    """One line for inputs that cannot work, before any sampling or feature: `samples` an .npz of
    more than PR_K uint8 (N, H, W, 3) images (None: still to be sampled, at `size` px);
    `reference` a folder of images, or an .npz with images (arr_0) or statistics (mu, sigma, and
    mu_s, sigma_s for sFID). Returns the reference's stored statistics, {name: array}."""
    if samples is not None:
        shape, dtype = npz_arrays(samples).get("arr_0", (None, None))
        if shape is None or len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise UserError(f"{samples} has no images: --evaluate needs arr_0, uint8 "
                            f"(N, H, W, 3), as sample.py writes it")
        if shape[0] <= PR_K:  # precision/recall's k-th neighbour
            raise UserError(f"{samples} holds {shape[0]} images; evaluate at least {PR_K + 1}")
        size = shape[1]
    if os.path.isdir(reference):
        if not image_paths(reference):
            raise UserError(f"--fid-ref {reference}: no images in this folder")
        return {}
    if not os.path.isfile(reference):
        raise UserError(f"--fid-ref {reference}: no such file or folder")
    arrays = npz_arrays(reference)
    if "arr_0" not in arrays and not {"mu", "sigma"} <= set(arrays):
        raise UserError(f"{reference} holds neither images (arr_0) nor statistics (mu, "
                        f"sigma); it has {', '.join(sorted(arrays)) or 'nothing'}")
    if "arr_0" in arrays:
        shape, dtype = arrays["arr_0"]
        if dtype != np.uint8 or tuple(shape[1:]) != (size, size, 3):
            raise UserError(f"the reference images in {reference} are {dtype} {shape[1:]}, "
                            f"the samples uint8 ({size}, {size}, 3)")
        if shape[0] <= PR_K:
            raise UserError(f"{reference} holds {shape[0]} images; use at least {PR_K + 1}")
    for (mu, sigma), dim in zip((("mu", "sigma"), ("mu_s", "sigma_s")), FEATURE_DIMS):
        for key, want in ((mu, (dim,)), (sigma, (dim, dim))):  # pool_3's and the spatial ones
            if key in arrays and tuple(arrays[key][0]) != want:
                raise UserError(f"{reference}: {key} is {tuple(arrays[key][0])}, not {want} "
                                f"(statistics of the FID Inception's {dim} features)")
    with np.load(reference) as stored:
        return {k: stored[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in arrays}


def adm_metrics(fake, real, stored):
    """The five numbers (None where the reference cannot give one). fake, real: (pool, spatial,
    logits) of the samples and of the reference images (real None: statistics only); the
    reference's stored statistics win over its images' (ADM's read_statistics)."""
    metrics = {"fid": None, "sfid": None, "inception_score": inception_score(fake[2].cpu())}
    for name, i, mu, sigma in (("fid", 0, "mu", "sigma"), ("sfid", 1, "mu_s", "sigma_s")):
        ref = (stored[mu], stored[sigma]) if mu in stored and sigma in stored else \
            None if real is None else gaussian_statistics(real[i].cpu())
        if ref is not None:
            metrics[name] = frechet_distance(*gaussian_statistics(fake[i].cpu()), *ref)
    metrics["precision"], metrics["recall"] = (None, None) if real is None else \
        precision_recall(real[0], fake[0])
    return metrics


def evaluate(samples, reference, inception="", batch=32):
    """FID, sFID, IS, precision and recall of the .npz `samples` against `reference`
    (check_evaluation), the features over all ranks; rank 0 prints them on one line, writes them
    to <samples>-vs-<reference>.json and returns them."""
    rank, _, device = processes()
    stored = check_evaluation(samples, reference)
    weights = inception_weights(inception)
    if weights is None:
        raise UserError(missing_inception())
    net = InceptionFeatures(weights).to(device)
    num, size = npz_arrays(samples)["arr_0"][0][:2]
    # plain float32 from here to the process's end (evaluation is a command's last work): cuDNN
    # convolutions use TF32 by default (10-bit mantissa), and --tf32 matmuls; the features feed
    # a covariance and 50K x 50K comparisons
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fake = inception_features(net, image_source(samples), batch, device, "samples")
    real = inception_features(net, image_source(reference, size), batch, device, "reference") \
        if os.path.isdir(reference) or "arr_0" in npz_arrays(reference) else None
    if rank != 0:
        return None
    if real is not None and len(real[0]) <= PR_K:  # a folder's unreadable files skipped
        raise UserError(f"{reference} gave {len(real[0])} images; use more than {PR_K}")
    metrics = adm_metrics(fake, real, stored)
    name = os.path.splitext(os.path.basename(os.path.normpath(reference)))[0]
    path = f"{os.path.splitext(samples)[0]}-vs-{name}.json"
    record = dict(metrics, samples=samples, num_samples=num, reference=reference,
                  num_reference_images=None if real is None else len(real[0]),
                  stored_statistics=sorted(stored), inception=weights)
    atomic_write(path, lambda f: json.dump(record, f, indent=1), mode="w")
    show = lambda key, spec: "n/a" if metrics[key] is None else format(metrics[key], spec)
    print(f"FID {show('fid', '.4f')}  sFID {show('sfid', '.4f')}  IS "
          f"{show('inception_score', '.2f')}  precision {show('precision', '.4f')}  recall "
          f"{show('recall', '.4f')}  ({num} samples vs {reference}; {path})", flush=True)
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("samples", help="an .npz whose arr_0 is uint8 (N, H, W, 3)")
    parser.add_argument("reference", help="an .npz of images (arr_0) or of statistics (mu, sigma, "
                        "mu_s, sigma_s), or a folder of images")
    parser.add_argument("--inception", default="", help="the FID Inception's weights (default: "
                        "torch.hub's cache, where torch-fidelity puts them)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    args = parser.parse_args(argv)
    try:
        evaluate(args.samples, args.reference, args.inception, args.batch_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
