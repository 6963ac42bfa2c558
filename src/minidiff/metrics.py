"""Sample-quality metrics in the shipped classifier's feature space, each with its real-data floor.

Definitions (also in docs/metrics.md):

* ``pseudo_fid``: Frechet distance between Gaussians fitted to the classifier's 128-wide
  penultimate features (after global average pooling) of the samples and of the reference split
  (torchmetrics' ``FrechetInceptionDistance`` with the classifier as its feature network).
* ``kid``: unbiased kernel inception distance (cubic polynomial kernel), mean over 50 random
  subsets of min(1000, n) samples (torchmetrics' ``KernelInceptionDistance``), same features.
* ``precision`` / ``recall``: Kynkaanniemi et al. 2019 with k = 3 in the same feature space: the
  fraction of samples inside the union of the reference's k-NN balls, and vice versa.
* ``ssim``: mean SSIM (Gaussian window 11, sigma 1.5, data range 1; torchmetrics) between each
  sample and a reference image paired at random (fixed seed) -- the study's likely definition.
  ``ssim_nearest``: mean SSIM between each sample and its nearest reference image in pixel L2.
* ``class_histogram``: fractions of samples per predicted class; ``class_max_dev``: the largest
  absolute deviation of those fractions from 1/10; ``confidence``: mean max softmax probability.
* ``memorization``: fraction of samples whose nearest *training* image (pixel L2) is closer than
  the 5th percentile of test-to-train nearest-neighbour distances (real test images: ~0.05).
* ``floor``: all of the above for ``n`` real training images (disjoint from the reference) --
  the best a generator can hope for at that sample size.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .classifier import features_and_logits, load_classifier, weights_path
from .data import DATASETS, load_split
from .errors import MinidiffError
from .files import atomic_write_text, cache_dir

MIN_SAMPLES = 10


class _Precomputed(nn.Module):
    """Lets torchmetrics' FID/KID consume features we computed (and cached) ourselves."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets ``a: [N x D]`` and ``b: [M x D]`` (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Precomputed(a.shape[1]))
    fid.update(b.double(), real=True)
    fid.update(a.double(), real=False)
    return float(fid.compute())


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 50, seed: int = 0) -> float:
    """Unbiased KID (mean over subsets) between ``a`` and ``b`` (torchmetrics)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, len(a), len(b))
    torch.manual_seed(seed)  # torchmetrics draws its subsets from the global RNG
    with warnings.catch_warnings():  # "will save all extracted features": that is the point
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(a.shape[1]), subsets=subsets,
                                      subset_size=size)
    kid.update(b.double(), real=True)
    kid.update(a.double(), real=False)
    mean, _ = kid.compute()
    return float(mean)


K_NN = 3  # k of the k-NN manifolds behind precision and recall


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    out = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor,
             chunk: int = 2048) -> torch.Tensor:
    """For each query row: is it inside any ball (ref_j, radii_j)?"""
    out = []
    for s in range(0, len(query), chunk):
        d = torch.cdist(query[s:s + chunk], ref)
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = K_NN,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds;
    ``real_radii`` (``_knn_radii(real, k)``, e.g. a :class:`Reference`'s cached ``radii``)
    skips recomputing the real set's radii, the costliest step for a 10,000-image reference."""
    fake, real = fake.float(), real.float()
    radii = _knn_radii(real, k) if real_radii is None else real_radii
    precision = _covered(fake, real, radii).float().mean().item()
    recall = _covered(real, fake, _knn_radii(fake, k)).float().mean().item()
    return precision, recall


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1).float() / 255.0


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024):
    """Pixel-L2 nearest neighbour of each uint8 image of ``query`` in ``ref`` -> (dist, index)."""
    q, r = _flat(query), _flat(ref)
    r_sq = (r * r).sum(1)
    dists, idx = [], []
    for s in range(0, len(q), chunk):
        qc = q[s:s + chunk]
        d2 = (qc * qc).sum(1, keepdim=True) - 2 * qc @ r.T + r_sq[None]
        v, i = d2.min(dim=1)
        dists.append(v.clamp_min(0).sqrt())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def ssim_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM between paired uint8 images ``a[i]``, ``b[i]`` (torchmetrics, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    vals = []
    for s in range(0, len(a), 2000):
        x = a[s:s + 2000].unsqueeze(1).float() / 255
        y = b[s:s + 2000].unsqueeze(1).float() / 255
        vals.append(ssim(x, y, data_range=1.0, reduction="none"))
    return torch.cat(vals).mean().item()


# --------------------------------------------------------------------------- reference cache


def memorization_threshold(dataset: str = "mnist", data_dir=None,
                           train_images: torch.Tensor | None = None) -> float:
    """The pixel-L2 distance below which a sample counts as a copy of a training image: the 5th
    percentile of the test images' distances to their nearest training image. The dataset's
    registry entry holds it where known (:class:`minidiff.data.DatasetSpec`); else computed."""
    known = DATASETS[dataset].memorization_threshold
    if known is not None:
        return known
    test, _ = load_split(dataset, "test", data_dir)
    if train_images is None:
        train_images, _ = load_split(dataset, "train", data_dir)
    d, _ = nearest(test, train_images)
    return torch.quantile(d, 0.05).item()


def _cache_key(dataset: str, reference: str) -> str:
    card = json.loads(weights_path(dataset).with_suffix(".json").read_text())
    return hashlib.sha256(f"{dataset}|{reference}|{card['sha256']}".encode()).hexdigest()[:16]


class Reference:
    """A reference split with its classifier features, the k-NN radii of those features
    (precision/recall) and the memorisation threshold, cached on disk."""

    def __init__(self, dataset: str = "mnist", reference: str = "test", data_dir=None):
        self.dataset, self.reference = dataset, reference
        self.classifier, self.card = load_classifier(dataset)
        self.images, self.labels = load_split(dataset, reference, data_dir)
        self.train_images, _ = load_split(dataset, "train", data_dir)
        folder = cache_dir() / "reference" / _cache_key(dataset, reference)
        cached = folder / "reference.safetensors"
        t = load_file(cached) if cached.is_file() else {}
        if "features" in t:
            self.features, self.threshold = t["features"], float(t["threshold"])
        else:
            self.features, _ = features_and_logits(self.classifier, self.images)
            self.threshold = memorization_threshold(dataset, data_dir, self.train_images)
        self.radii = t.get(f"radii_k{K_NN}")
        if self.radii is None:  # also for caches written before the radii were kept
            self.radii = _knn_radii(self.features.float(), K_NN)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / ".reference.tmp"
            save_file({"features": self.features.contiguous(),
                       "threshold": torch.tensor(self.threshold),
                       f"radii_k{K_NN}": self.radii.contiguous()}, str(tmp))
            tmp.replace(cached)
        self.folder = folder


def evaluate_images(images: torch.Tensor, ref: Reference, seed: int = 0) -> dict:
    """All metrics of uint8 images ``[N x 28 x 28]`` against ``ref`` (without the floor)."""
    feats, logits = features_and_logits(ref.classifier, images)
    probs = logits.softmax(1)
    hist = torch.bincount(probs.argmax(1), minlength=10).float() / len(images)
    precision, recall = precision_recall(feats, ref.features, real_radii=ref.radii)
    g = torch.Generator().manual_seed(seed)
    paired = ref.images[torch.randint(0, len(ref.images), (len(images),), generator=g)]
    _, nn_ref = nearest(images, ref.images)
    d_train, _ = nearest(images, ref.train_images)
    return {
        "pseudo_fid": frechet_distance(feats, ref.features),
        "kid": kernel_distance(feats, ref.features, seed=seed),
        "precision": precision,
        "recall": recall,
        "ssim": ssim_mean(images, paired),
        "ssim_nearest": ssim_mean(images, ref.images[nn_ref]),
        "class_histogram": [round(v, 4) for v in hist.tolist()],
        "class_max_dev": (hist - 0.1).abs().max().item(),
        "confidence": probs.max(1).values.mean().item(),
        "memorization": (d_train < ref.threshold).float().mean().item(),
        "n": len(images),
    }


def evaluate_conditional(images: torch.Tensor, labels: torch.Tensor, ref: Reference) -> dict:
    """How well samples drawn for requested classes ``labels: [N]`` match them: the share the
    shipped classifier assigns to the requested class (overall and per class), and pseudo-FID
    per class against the reference images of that class."""
    feats, logits = features_and_logits(ref.classifier, images)
    hit = logits.argmax(1) == labels
    per_class = {}
    for c in labels.unique().tolist():
        m = labels == c
        entry = {"n": int(m.sum()), "accuracy": hit[m].float().mean().item()}
        if entry["n"] >= MIN_SAMPLES:
            entry["pseudo_fid"] = frechet_distance(feats[m], ref.features[ref.labels == c])
        per_class[str(c)] = entry
    fids = [e["pseudo_fid"] for e in per_class.values() if "pseudo_fid" in e]
    return {"conditional_accuracy": hit.float().mean().item(),
            "per_class_pseudo_fid_mean": sum(fids) / len(fids) if fids else None,
            "per_class": per_class}


def floor(ref: Reference, n: int, seed: int = 0) -> dict:
    """The metrics of ``n`` real images from the other split than the reference (training
    images against ``test``, test images against ``train``), cached on disk. Memorisation is
    always measured on held-out test images, since training images are their own neighbours."""
    path = ref.folder / f"floor-{n}-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    g = torch.Generator().manual_seed(seed + 1)
    if ref.reference == "test":
        # real *training* images against the test reference; memorisation is measured on
        # held-out images instead (training images are their own nearest neighbours)
        pool = ref.train_images
    else:
        pool = load_split(ref.dataset, "test")[0]
    if n > len(pool):
        raise MinidiffError(f"n = {n} is larger than the {len(pool)} real images available "
                            "for the floor; evaluate fewer samples")
    real = pool[torch.randperm(len(pool), generator=g)[:n]]
    out = evaluate_images(real, ref, seed)
    if ref.reference == "test":
        test = ref.images[torch.randperm(len(ref.images), generator=g)[:n]]
        d, _ = nearest(test, ref.train_images)
        out["memorization"] = (d < ref.threshold).float().mean().item()
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    return out


def evaluate(images: torch.Tensor, dataset: str = "mnist", reference: str = "test",
             data_dir=None, with_floor: bool = True, seed: int = 0,
             labels: torch.Tensor | None = None) -> dict:
    """Metrics of ``images`` (uint8 ``[N x 28 x 28]``) with their real-data floor; with the
    requested ``labels: [N]`` of a conditional sample file, also :func:`evaluate_conditional`."""
    if len(images) < MIN_SAMPLES:
        raise MinidiffError(f"{len(images)} samples are too few to evaluate (k-NN precision/"
                            f"recall and KID need at least {MIN_SAMPLES}); sample more")
    ref = Reference(dataset, reference, data_dir)
    out = evaluate_images(images, ref, seed)
    if labels is not None:
        out.update(evaluate_conditional(images, labels, ref))
    if with_floor:
        out["floor"] = floor(ref, len(images), seed)
    return out


# each metric of the table and which way is better (docs/metrics.md)
TABLE = (("pseudo_fid", "lower"), ("kid", "lower"), ("precision", "higher"),
         ("recall", "higher"), ("ssim", "see docs"), ("ssim_nearest", "see docs"),
         ("class_max_dev", "lower"), ("confidence", "higher"), ("memorization", "lower"))


def metrics_table(res: dict, floor: dict | None = None, label: str = "samples") -> str:
    """:func:`evaluate`'s result as the text table `minidiff eval` prints: each metric beside its
    real-data ``floor``, the class histogram, and for a conditional sample file its per-class
    accuracy and pseudo-FID."""
    lines = [f"{'metric':<14} {label:>10} {'real floor' if floor else '':>11}  better"]
    for key, better in TABLE:
        f = f"{floor[key]:>11.4f}" if floor else f"{'':>11}"
        lines.append(f"{key:<14} {res[key]:>10.4f} {f}  {better}")
    lines.append(f"{'classes 0-9':<14} {' '.join(f'{v:.3f}' for v in res['class_histogram'])}")
    lines.append(f"n = {res['n']}")
    if "conditional_accuracy" in res:
        lines += ["", "conditional accuracy (the classifier agrees with the requested class): "
                  f"{res['conditional_accuracy']:.4f}",
                  f"{'class':>5} {'n':>6} {'accuracy':>9} {'pseudo-FID':>11}"]
        for c, e in res["per_class"].items():
            fid = f"{e['pseudo_fid']:.3f}" if "pseudo_fid" in e else "(n<10)"
            lines.append(f"{c:>5} {e['n']:>6} {e['accuracy']:>9.4f} {fid:>11}")
    return "\n".join(lines)
