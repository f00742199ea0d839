"""Evaluation's driver side: scores a finished run's samples, reconstructions, complexity and latent–data distance.

The heavy parts run as Ray tasks with the run's per-worker resources (a GPU each when the run trained
on GPUs), side by side: samples are drawn in `eval.sample_tasks` chunks, the held-out images are
reconstructed by every decoder, and the latent–data distance is estimated. Each task embeds its images
in every feature space and returns features only; the driver computes the distances.

Feature spaces, and so metric names (a distance on random-network features is not FID):
    inception  torchmetrics' Inception from a verified local file      -> fid, kid, is, precision_inception ...
    shapesclf  a classifier the project trains on builtin:shapes        -> fd_shapesclf, kd_shapesclf ...
    dataclf    the same classifier on other data with >= 2 classes      -> fd_dataclf, kd_dataclf ...
    selfsup    a self-supervised net trained on data with fewer classes -> fd_selfsup, kd_selfsup ...
    randfeat   a fixed, seeded random conv net (always; a weak fallback) -> fd_randfeat, kd_randfeat ...
Each space's sensitivity to blur, noise and patch shuffling is measured once on the real images
(eval/sensitivity.py). Real-image features, trained networks and sensitivities are cached per data set
and feature network under `<storage>/eval_cache/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from raydae.checkpoints import load_generator, load_task
from raydae.config import Config
from raydae.data.images import model_input
from raydae.errors import UserError
from raydae.eval import RandomFeatureNet, frechet_distance, kernel_distance, precision_recall
from raydae.eval.classifier import kl_divergence, load_classifier, save_classifier, train_classifier
from raydae.eval.complexity import (
    count_flops,
    empirical_lipschitz,
    flops_per_image,
    lipschitz_blockers,
    lipschitz_upper_bound,
    spectral_norm_product,
)
from raydae.eval.inception import RESIZE, InceptionFeatures, inception_score, resolve_inception_weights
from raydae.eval.latent_distance import estimate_latent_distance
from raydae.eval.selfsup import (
    load_degradation_estimator,
    save_degradation_estimator,
    train_degradation_estimator,
)
from raydae.eval.sensitivity import DEGRADATIONS, feature_sensitivity
from raydae.latents import data_fingerprint
from raydae.models import build_decoder, count_parameters
from raydae.storage import RunFolder
from raydae.tasks import run_bottleneck

RANDFEAT, INCEPTION = "randfeat", "inception"
SHAPES_CLASSIFIER, DATA_CLASSIFIER, SELFSUP = "shapesclf", "dataclf", "selfsup"
CACHE_FOLDER = "eval_cache"
# The metric that heads tables and sweeps: the best-founded feature space present. At most one trained
# space exists per data set; the random net comes last, a weak fallback.
HEADLINE_ORDER = ((INCEPTION, "fid"), (SHAPES_CLASSIFIER, "fd_shapesclf"), (DATA_CLASSIFIER, "fd_dataclf"),
                  (SELFSUP, "fd_selfsup"), (RANDFEAT, "fd_randfeat"))
CLASSIFIER_IMAGES = (10000, 2000)  # train / val images a trained feature network learns from and is checked on
# Shapes keep their class upside down; photos mostly do not (an upside-down image is off the data), so other
# data sets get left-right flips only.
CLASSIFIER_FLIPS = {SHAPES_CLASSIFIER: "hv", DATA_CLASSIFIER: "h"}
WEAK_FALLBACK = ("fixed random conv features: a weak fallback, nearly blind to blur and noise (see "
                 "feature_sensitivity); comparable only between runs scored with the same seed and dim")


def metric_name(kind: str, space: str) -> str:
    """`fd`/`kd`/`precision`/`recall` in `space` -> its key: Inception's are FID/KID, the others say their features."""
    if space == INCEPTION and kind in ("fd", "kd"):
        return {"fd": "fid", "kd": "kid"}[kind]
    return f"{kind}_{space}"


def trained_space(source: str, num_classes: int, steps: int) -> str | None:
    """The feature network raydae trains for a data set: a classifier where there are classes to learn
    (`shapesclf` on builtin:shapes, `dataclf` on other data with >= 2 classes), else the self-supervised
    net (`selfsup`); None when `eval.classifier_steps` is 0."""
    if steps <= 0:
        return None
    if source.strip() == "builtin:shapes":
        return SHAPES_CLASSIFIER
    return DATA_CLASSIFIER if num_classes >= 2 else SELFSUP


def headline_metric(spaces: list[str]) -> str:
    """The metric that heads tables and sweeps: the first space of HEADLINE_ORDER that is present."""
    return next(metric for space, metric in HEADLINE_ORDER if space in spaces)


# ------------------------------------------------------------------------------- feature networks
@dataclass
class FeatureSpec:
    """What every task needs to build the same feature networks (small and picklable)."""

    randfeat_seed: int
    randfeat_dim: int
    classifier: bytes | None  # a saved classifier (raydae.eval.classifier), scoring in `classifier_space`
    inception_path: str | None  # a verified weights file; must be readable on every node
    classifier_space: str = SHAPES_CLASSIFIER  # shapesclf on builtin:shapes, dataclf on other labelled data
    selfsup: bytes | None = None  # a saved degradation estimator (raydae.eval.selfsup) for unlabelled data

    @property
    def spaces(self) -> list[str]:
        present = ((INCEPTION, self.inception_path), (self.classifier_space, self.classifier),
                   (SELFSUP, self.selfsup), (RANDFEAT, True))
        return [space for space, on in present if on]

    def identity(self) -> str:
        """Changes whenever a feature network changes: keys the real-feature cache."""
        digest = hashlib.sha256(f"{self.randfeat_seed}:{self.randfeat_dim}:{self.inception_path}".encode())
        digest.update(self.classifier or b"")
        # Only new spaces add to the digest, so the caches of builtin:shapes runs stay valid.
        if self.classifier_space != SHAPES_CLASSIFIER:
            digest.update(self.classifier_space.encode())
        if self.selfsup is not None:
            digest.update(SELFSUP.encode() + self.selfsup)
        return digest.hexdigest()[:12]


class Embedder:
    """Images in [-1, 1] -> features in every space of the spec (+ Inception logits, classifier predictions)."""

    def __init__(self, spec: FeatureSpec, device: torch.device):
        self.device = device
        self.randfeat = RandomFeatureNet(spec.randfeat_seed, spec.randfeat_dim).to(device)
        self.classifier_space = spec.classifier_space
        self.classifier = None
        if spec.classifier is not None:
            self.classifier, _ = load_classifier(io.BytesIO(spec.classifier))
            self.classifier.to(device).eval()
        self.selfsup = None
        if spec.selfsup is not None:
            self.selfsup, _ = load_degradation_estimator(io.BytesIO(spec.selfsup))
            self.selfsup.to(device).eval()
        self.inception = None
        if spec.inception_path:
            self.inception = InceptionFeatures(spec.inception_path).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        images = images.to(self.device, torch.float32).clamp(-1, 1)
        out = {RANDFEAT: self.randfeat(images)}
        if self.classifier is not None:
            out[self.classifier_space] = self.classifier.features(images)
            out[f"{self.classifier_space}_class"] = self.classifier(images).argmax(dim=1)
        if self.selfsup is not None:
            out[SELFSUP] = self.selfsup.features(images)
        if self.inception is not None:
            out[INCEPTION], out["inception_logits"] = self.inception(images)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}


class FeatureBank:
    """Per-batch embeddings gathered into one array per key."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, embedded: dict[str, np.ndarray]) -> None:
        for key, value in embedded.items():
            self.parts.setdefault(key, []).append(value)

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts) for key, parts in self.parts.items()}


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def collect_images(dataset, limit: int) -> dict[str, np.ndarray]:
    """The first `limit` rows of a split as uint8 images and labels, read by the driver.

    Tasks get these arrays (through the object store) rather than the Dataset: a task holding a CPU
    while Ray Data waits for one to run its own read tasks deadlocks a small cluster.
    """
    images, labels = [], []
    for batch in dataset.limit(limit).iter_batches(batch_size=1000, batch_format="numpy"):
        images.append(np.asarray(batch["image"]))  # uint8 3 x S x S, as the data sets yield them
        labels.append(np.asarray(batch["label"], dtype=np.int64))
    if not images:
        raise UserError("evaluation found no images in the data split; check data.source")
    return {"image": np.concatenate(images), "label": np.concatenate(labels)}


def _images(image_set: dict[str, np.ndarray], limit: int, batch_size: int, device: torch.device):
    """Batches of {image: float in [-1, 1], label} from a collected image set."""
    count = min(limit, len(image_set["image"]))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        # Arrays from the object store are read-only; torch.tensor copies them.
        images = model_input(torch.tensor(image_set["image"][start:stop], device=device))
        yield {"image": images, "label": torch.tensor(image_set["label"][start:stop], device=device)}


# ----------------------------------------------------------------------------------- Ray tasks
def embed_real(image_set, limit: int, spec: FeatureSpec, batch_size: int, *, use_gpu: bool) -> dict[str, np.ndarray]:
    """Features of the first `limit` real images of a split (the reference set)."""
    embed, bank = Embedder(spec, _device(use_gpu)), FeatureBank()
    for batch in _images(image_set, limit, batch_size, embed.device):
        bank.add(embed(batch["image"]))
        bank.add({"label": batch["label"].cpu().numpy()})
    return bank.arrays()


def measure_sensitivity(image_set, count: int, spec: FeatureSpec, batch_size: int, seed: int, *,
                        use_gpu: bool) -> dict[str, dict]:
    """`feature_sensitivity` of every space of `spec` on the first `count` real images: {space: report}."""
    embed = Embedder(spec, _device(use_gpu))
    images = model_input(torch.tensor(image_set["image"][:count]))
    return feature_sensitivity(lambda x: {space: embed(x)[space] for space in spec.spaces}, images, seed=seed,
                               batch_size=batch_size)


def reconstruct_and_measure(checkpoints: dict[str, str], image_set, limit: int, spec: FeatureSpec, batch_size: int,
                            lipschitz_latents: int, seed: int, *, use_gpu: bool) -> dict:
    """Held-out images through every decoder: MSE/PSNR/SSIM, features of the reconstructions, complexity.

    `checkpoints` maps a role (aux_decoder, decoder) to the stage checkpoint that trained it. The held-out
    real images' features come back too (`real`), for the real-vs-real floor.
    """
    device = _device(use_gpu)
    embed = Embedder(spec, device)
    out: dict = {}
    real_bank = FeatureBank()
    for role, uri in checkpoints.items():
        task = load_task(uri, ("stage1", "stage2", "joint"), device=str(device))
        bank, latents = FeatureBank(), []

        def observe(images, recon, bottleneck_out):
            bank.add(embed(recon))
            if not latents or sum(len(z) for z in latents) < lipschitz_latents:
                latents.append(bottleneck_out.z.detach())
            if not out:  # the first decoder's pass also embeds the real images once
                real_bank.add(embed(images))

        metrics = task.evaluate(_images(image_set, limit, batch_size, device), observe=observe)
        z = torch.cat(latents)[:lipschitz_latents]
        image_shape = (3, task.config.data.image_size, task.config.data.image_size)
        blockers = lipschitz_blockers(task.decoder)
        encoder_flops = flops_per_image(lambda x: run_bottleneck(task.bottleneck, task.encoder(x), sample=False),
                                        torch.zeros((1, *image_shape), device=device))
        out[role] = {
            "metrics": {key.split("/", 1)[1]: value for key, value in metrics.items()},
            "features": bank.arrays(),
            "complexity": {
                "parameters": count_parameters(task.decoder),
                "flops_per_image": flops_per_image(task.decoder, z[:1]),
                "lipschitz_upper_bound": None if blockers else _lipschitz_bound(task.decoder, z.shape[1:]),
                "lipschitz_upper_bound_note": "; ".join(blockers[:1]) + (" (and more)" if len(blockers) > 1 else "")
                if blockers else "",
                "spectral_norm_product": spectral_norm_product(task.decoder, tuple(z.shape[1:])),
                "lipschitz_empirical": empirical_lipschitz(task.decoder, z, eps=1e-2, seed=seed),
            },
            "encoder_complexity": {
                "parameters": count_parameters(task.encoder) + count_parameters(task.bottleneck),
                "flops_per_image": encoder_flops,
            },
        }
        if not out.get("real"):
            out["real"] = real_bank.arrays()
    return out


def _lipschitz_bound(decoder, latent_shape) -> float | None:
    return lipschitz_upper_bound(decoder, tuple(latent_shape))


def sample_and_embed(generator_uri: str, start: int, count: int, seed: int, spec: FeatureSpec, batch_size: int,
                     measure_complexity: bool, *, use_gpu: bool) -> dict:
    """Samples `start .. start+count` of the evaluation set; seeds depend only on (seed, index of the chunk)."""
    device = _device(use_gpu)
    task = load_generator(generator_uri, device=str(device))
    embed, bank = Embedder(spec, device), FeatureBank()
    for offset in range(0, count, batch_size):
        n = min(batch_size, count - offset)
        index = start + offset
        labels = None
        if task.conditional:  # a balanced class mix over the whole evaluation set
            labels = torch.arange(index, index + n, device=device) % task.options["num_classes"]
            bank.add({"requested_class": labels.cpu().numpy()})
        images = task.sample(n, seed=seed * 1_000_003 + index, labels=labels)
        bank.add(embed(images))
    out = {"features": bank.arrays()}
    if measure_complexity:
        x = torch.zeros((1, *task.latent_shape), device=device)
        forward = _generator_forward(task, x)
        steps = task.config.dit.sample_steps if task.config.generator == "dit" else task.latent_shape[1] * task.latent_shape[2]
        out["complexity"] = {
            "parameters": count_parameters(task.generator_module),
            "flops_per_forward": count_flops(forward),
            # Everything one sample costs: every denoising step (or every code, with the key/value
            # cache), classifier-free guidance when on, and decoding by the final decoder.
            "flops_per_sample": count_flops(lambda: task.sample(1, seed=0)),
            "sampling_steps": steps,
        }
    return out


def _generator_forward(task, x: torch.Tensor):
    device = x.device
    if task.config.generator == "dit":
        y = torch.zeros(1, dtype=torch.long, device=device) if task.conditional else None
        t = torch.zeros(1, dtype=torch.long, device=device)
        return lambda: task.dit_ema(x, t, y) if y is not None else task.dit_ema(x, t)
    codes = torch.zeros((1, task.latent_shape[1] * task.latent_shape[2]), dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if task.conditional else None
    return lambda: task.prior(codes, y)


def _first(image_set, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(n, len(image_set["image"]))
    return model_input(torch.tensor(image_set["image"][:n])), torch.tensor(image_set["label"][:n])


def train_feature_classifier(train, val, num_classes: int, steps: int, seed: int, flips: str, *, use_gpu: bool,
                             limit: int = CLASSIFIER_IMAGES[0]) -> tuple[bytes, dict]:
    """The classifier of `shapesclf` / `dataclf`, trained on the real images' labels; saved bytes and info."""
    x, y = _first(train, limit)
    model, info = train_classifier(x, y, num_classes, steps=steps, flips=flips, seed=seed,
                                   val=_first(val, CLASSIFIER_IMAGES[1]), device=_device(use_gpu))
    buffer = io.BytesIO()
    save_classifier(model.cpu(), buffer, info)
    return buffer.getvalue(), info


def train_selfsup(train, val, steps: int, seed: int, *, use_gpu: bool,
                  limit: int = CLASSIFIER_IMAGES[0]) -> tuple[bytes, dict]:
    """The network of `selfsup`, trained on the real images alone; saved bytes and info."""
    model, info = train_degradation_estimator(_first(train, limit)[0], steps=steps, seed=seed,
                                              val=_first(val, CLASSIFIER_IMAGES[1])[0], device=_device(use_gpu))
    buffer = io.BytesIO()
    save_degradation_estimator(model.cpu(), buffer, info)
    return buffer.getvalue(), info


def latent_distance(autoencoder_uri: str, train, val, limit: int, steps: int, critic_steps: int, seed: int, *,
                    use_gpu: bool) -> dict:
    """docs/latent_distance.md: the final decoder's class trained on the frozen latents against a fixed critic."""
    device = _device(use_gpu)
    task = load_task(autoencoder_uri, ("stage2", "joint"), device=str(device))

    def encode(image_set, n):
        images, latents = [], []
        for batch in _images(image_set, n, 500, device):
            images.append(batch["image"].cpu())
            latents.append(run_bottleneck(task.bottleneck, task.encoder(batch["image"]), sample=False).z.cpu())
        return torch.cat(latents), torch.cat(images)

    with torch.no_grad():
        z_train, x_train = encode(train, limit)
        z_val, x_val = encode(val, max(limit // 4, 64))
    config = task.config
    result = estimate_latent_distance(
        lambda: build_decoder(config.ae, config.ae.decoder), z_train, x_train, z_val, x_val,
        decoder_steps=steps, critic_steps=critic_steps, seed=seed, device=str(device))
    return {"decoder": "decoder", **result.as_dict()}


# --------------------------------------------------------------------------------------- driver
def _data_key(config: Config, *parts) -> str:
    text = json.dumps([data_fingerprint(config.data), *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as archive:
        return {key: archive[key] for key in archive.files}


def feature_spec(config: Config, cache: RunFolder, images: dict, num_classes: int, run_task) -> tuple[FeatureSpec, dict]:
    """The feature networks of this evaluation, and their descriptions for metrics.json.

    `run_task(fn, *args)` runs a training function (a Ray task in evaluation); trained networks are cached.
    """
    ev = config.eval
    inception = resolve_inception_weights(ev.inception_weights, ev.inception_sha256)
    described = {RANDFEAT: f"RandomFeatureNet(seed={ev.randfeat_seed}, dim={ev.randfeat_dim}): {WEAK_FALLBACK}"}
    if inception:
        described[INCEPTION] = f"Inception-v3 pool3 (2048), weights {inception}; resize {RESIZE}"
    space = trained_space(config.data.source, num_classes, ev.classifier_steps)
    classifier = selfsup = None
    if space in (SHAPES_CLASSIFIER, DATA_CLASSIFIER):
        classifier, described[space] = _trained_classifier(config, cache, images, num_classes, space, run_task)
        if classifier is None:  # too weak to measure anything: the self-supervised net scores instead
            space = SELFSUP
    if space == SELFSUP:
        selfsup, described[SELFSUP] = _trained_selfsup(config, cache, images, run_task)
    spec = FeatureSpec(ev.randfeat_seed, ev.randfeat_dim, classifier, inception,
                       classifier_space=space if classifier else SHAPES_CLASSIFIER, selfsup=selfsup)
    return spec, described


def _cached_training(cache: RunFolder, name: str, run_task, fn, *args) -> tuple[bytes, dict, bool]:
    """A trained network's bytes and info from the cache, or trained now and cached: (bytes, info, trained)."""
    if cache.exists(name):
        return cache.read_bytes(name), json.loads(cache.read_text(name + ".json")), False
    data, info = run_task(fn, *args)
    cache.write_bytes(name, data)
    cache.write_text(name + ".json", json.dumps(info, indent=2))
    return data, info, True


def _trained_classifier(config: Config, cache: RunFolder, images: dict, num_classes: int, space: str,
                        run_task) -> tuple[bytes | None, str]:
    """The classifier of `space` (None when below eval.min_classifier_accuracy) and its description."""
    ev, flips = config.eval, CLASSIFIER_FLIPS[space]
    # builtin:shapes keeps its key (and so the classifiers already cached); other data adds the flips.
    key = _data_key(config, ev.classifier_steps, ev.seed) if space == SHAPES_CLASSIFIER \
        else _data_key(config, ev.classifier_steps, ev.seed, space, flips)
    name = f"classifier-{key}.pt"
    what = "shapes" if space == SHAPES_CLASSIFIER else "data"
    t0 = time.time()
    classifier, info, trained = _cached_training(cache, name, run_task, train_feature_classifier, images["train"],
                                                 images["val"], num_classes, ev.classifier_steps, ev.seed, flips)
    accuracy = info.get("val_accuracy", float("nan"))
    if trained:
        print(f"[eval] trained the {what} classifier in {time.time() - t0:.0f}s (val accuracy {accuracy:.3f}); "
              f"cached in {cache.child(name)}", flush=True)
    text = (f"penultimate features of raydae's {what} classifier ({num_classes} classes, {ev.classifier_steps} "
            f"steps, flips {flips}, val accuracy {accuracy:.3f})")
    if accuracy >= ev.min_classifier_accuracy:
        return classifier, text
    print(f"[eval] the {what} classifier reached only {accuracy:.3f} val accuracy (< eval.min_classifier_accuracy "
          f"{ev.min_classifier_accuracy}); scoring in the self-supervised space ({SELFSUP}) instead. More data or "
          "eval.classifier_steps would help", flush=True)
    return None, f"not used: {text} is below eval.min_classifier_accuracy"


def _trained_selfsup(config: Config, cache: RunFolder, images: dict, run_task) -> tuple[bytes, str]:
    """The self-supervised network (raydae.eval.selfsup) and its description."""
    ev = config.eval
    name = f"selfsup-{_data_key(config, ev.classifier_steps, ev.seed, SELFSUP)}.pt"
    t0 = time.time()
    net, info, trained = _cached_training(cache, name, run_task, train_selfsup, images["train"], images["val"],
                                          ev.classifier_steps, ev.seed)
    if trained:
        print(f"[eval] trained the self-supervised feature net in {time.time() - t0:.0f}s (val error of its blur/"
              f"noise estimates {info.get('val_error', float('nan')):.3f}); cached in {cache.child(name)}", flush=True)
    return net, (f"penultimate features of raydae's degradation estimator, self-supervised on the real images "
                 f"({ev.classifier_steps} steps, val error {info.get('val_error', float('nan')):.3f})")


def _distances(real: dict, fake: dict, spec: FeatureSpec, config: Config, full: bool) -> dict:
    """Every distance between two embedded sets, in every space, under its proper name."""
    ev = config.eval
    out: dict = {}
    for space in spec.spaces:
        a, b = real[space], fake[space]
        out[metric_name("fd", space)] = frechet_distance(a, b)
        if not full:
            continue
        kd, kd_std = kernel_distance(a, b, subsets=ev.kid_subsets, subset_size=ev.kid_subset_size, seed=ev.seed)
        out[metric_name("kd", space)] = kd
        out[metric_name("kd", space) + "_std"] = kd_std
        precision, recall = precision_recall(a, b, k=ev.knn_k)
        out[metric_name("precision", space)] = precision
        out[metric_name("recall", space)] = recall
    return out


def _class_metrics(real: dict, fake: dict, label_names: list[str], spec: FeatureSpec) -> dict:
    """The samples' class mix as the trained classifier sees it (and how often a requested class came out)."""
    key = f"{spec.classifier_space}_class"
    if key not in fake:
        return {}
    k = len(label_names)
    fake_hist = np.bincount(fake[key], minlength=k) / len(fake[key])
    real_hist = np.bincount(real[key], minlength=k) / len(real[key])
    out = {"class_fractions": {name: float(f) for name, f in zip(label_names, fake_hist)},
           "class_kl_to_real": float(kl_divergence(torch.tensor(fake_hist), torch.tensor(real_hist)))}
    if "requested_class" in fake:
        out["conditional_accuracy"] = float((fake[key] == fake["requested_class"]).mean())
    return out


def run_bounded(jobs: dict, limit: int, options: dict, **kwargs) -> dict:
    """Run `{key: (fn, *args)}` as Ray tasks, at most `limit` at a time; returns `{key: result}`."""
    import ray

    queue, running, results = list(jobs.items()), {}, {}
    while queue or running:
        while queue and len(running) < limit:
            key, (fn, *args) = queue.pop(0)
            running[ray.remote(**options)(fn).remote(*args, **kwargs)] = key
        done, _ = ray.wait(list(running), num_returns=1)
        results[running.pop(done[0])] = ray.get(done[0])
    return results


def _task_options(config: Config) -> dict:
    """Ray task options of evaluation: the run's per-worker resources, outside any trial's placement group."""
    scaling = config.scaling
    # "DEFAULT" scheduling: inside a sweep trial, tasks would otherwise be captured by the trial's tiny
    # placement group, where they cannot fit.
    return {"num_cpus": scaling.cpus_per_worker, "num_gpus": scaling.gpus_per_worker if scaling.use_gpu else 0,
            "scheduling_strategy": "DEFAULT"}


def _run_task(config: Config):
    """`run_task(fn, *args)`: one Ray task with evaluation's resources, waited for."""
    import ray

    options = _task_options(config)

    def run_task(fn, *args):
        return ray.get(ray.remote(**options)(fn).remote(*args, use_gpu=config.scaling.use_gpu))

    return run_task


def _shared_images(config: Config, bundle) -> dict:
    """Every image any evaluation task needs, read once by the driver and shared through the object store."""
    import ray

    ev = config.eval
    train_needed = max(ev.num_real, ev.latent_distance_images if ev.latent_distance_steps > 0 else 0,
                       CLASSIFIER_IMAGES[0] if ev.classifier_steps > 0 else 0)
    val_needed = max(ev.num_reconstructions, ev.latent_distance_images // 4,
                     CLASSIFIER_IMAGES[1] if ev.classifier_steps > 0 else 0)
    return {"train": ray.put(collect_images(bundle.train, train_needed)),
            "val": ray.put(collect_images(bundle.val, val_needed))}


def _real_cache_name(config: Config, spec: FeatureSpec) -> str:
    return f"real-{_data_key(config, config.eval.num_real, spec.identity())}.npz"


def _sensitivity_images(config: Config) -> int:
    """How many of the cached real images the sensitivity check uses (0: none)."""
    count = min(config.eval.sensitivity_images, config.eval.num_real)
    if 0 < count < 4:
        raise UserError(f"config eval.sensitivity_images={config.eval.sensitivity_images}: the sensitivity check "
                        "needs at least 4 images (two halves of 2); 0 turns it off")
    return count


def _sensitivity_cache_name(config: Config, spec: FeatureSpec) -> str:
    key = _data_key(config, _sensitivity_images(config), spec.identity(), DEGRADATIONS, config.eval.seed)
    return f"sensitivity-{key}.json"


def real_reference(run: RunFolder, config: Config, bundle) -> tuple[FeatureSpec, dict[str, np.ndarray]]:
    """The feature networks and the real images' features in each of them (trained/embedded once, cached).

    The sample probe needs them before the generator trains; evaluation finds them in the cache later."""
    cache = RunFolder(run.storage, CACHE_FOLDER)
    run_task = _run_task(config)
    images = _shared_images(config, bundle)
    spec, _ = feature_spec(config, cache, images, len(bundle.label_names), run_task)
    name = _real_cache_name(config, spec)
    if cache.exists(name):
        return spec, _load_arrays(cache.read_bytes(name))
    real = run_task(embed_real, images["train"], config.eval.num_real, spec, config.eval.batch_size)
    cache.write_bytes(name, _save_arrays(real))
    return spec, real


def evaluate_run(run: RunFolder, config: Config, bundle) -> dict:
    """Everything `eval` measures for a run whose stages (and generator) finished. Ray must be up."""
    ev, scaling = config.eval, config.scaling
    started = time.time()
    options = _task_options(config)
    sensitivity_count = _sensitivity_images(config)

    # At most one task per slot the run trained with (its workers plus the one Ray Data used): a sweep's
    # embedded cluster is sized for exactly that, and a finished trial's evaluation must not starve the
    # trial still training beside it.
    slots = scaling.num_workers + 1
    images = _shared_images(config, bundle)
    cache = RunFolder(run.storage, CACHE_FOLDER)
    spec, described = feature_spec(config, cache, images, len(bundle.label_names), _run_task(config))

    stages = {s: run.read_json(f"{s}.done.json")["checkpoint"] for s in config.stages()}
    roles = {"aux_decoder": stages["stage1"], "decoder": stages["stage2"]} if config.train.mode == "dae" \
        else {"decoder": stages["joint"]}
    jobs = {"recon": (reconstruct_and_measure, roles, images["val"], ev.num_reconstructions, spec,
                      ev.batch_size, ev.lipschitz_latents, ev.seed)}
    real_name = _real_cache_name(config, spec)
    if not cache.exists(real_name):
        jobs["real"] = (embed_real, images["train"], ev.num_real, spec, ev.batch_size)
    sensitivity_name = _sensitivity_cache_name(config, spec)
    if sensitivity_count and not cache.exists(sensitivity_name):
        jobs["sensitivity"] = (measure_sensitivity, images["train"], sensitivity_count, spec, ev.batch_size, ev.seed)
    generator_uri = run.read_json("generator.done.json")["checkpoint"] if run.exists("generator.done.json") else None
    if generator_uri:
        tasks = ev.sample_tasks or scaling.num_workers
        size = -(-ev.num_samples // tasks)
        for i, start in enumerate(range(0, ev.num_samples, size)):
            jobs[f"samples{i}"] = (sample_and_embed, generator_uri, start, min(size, ev.num_samples - start),
                                   ev.seed, spec, ev.batch_size, i == 0)
    if ev.latent_distance_steps > 0:
        jobs["distance"] = (latent_distance, roles["decoder"], images["train"], images["val"],
                            ev.latent_distance_images, ev.latent_distance_steps,
                            ev.latent_distance_critic_steps, ev.seed)

    results = run_bounded(jobs, slots, options, use_gpu=scaling.use_gpu)
    if "real" in results:
        cache.write_bytes(real_name, _save_arrays(results["real"]))
        real = results["real"]
    else:
        real = _load_arrays(cache.read_bytes(real_name))
    if "sensitivity" in results:
        cache.write_text(sensitivity_name, json.dumps(results["sensitivity"], indent=2))
    recon = results["recon"]
    parts = [results[key] for key in jobs if key.startswith("samples")]

    out: dict = {"features": described, "num_real": len(real[RANDFEAT])}
    out["headline"] = headline_metric(spec.spaces)
    if sensitivity_count:
        out["feature_sensitivity"] = json.loads(cache.read_text(sensitivity_name))
        _say_if_blind(out["feature_sensitivity"], out["headline"])
    if generator_uri:
        fake_bank = FeatureBank()
        for part in parts:
            fake_bank.add(part["features"])
        fake = fake_bank.arrays()
        samples = {"num": len(fake[RANDFEAT]), **_distances(real, fake, spec, config, full=True)}
        if INCEPTION in spec.spaces:
            samples["is"], samples["is_std"] = inception_score(torch.from_numpy(fake["inception_logits"]))
        samples.update(_class_metrics(real, fake, bundle.label_names, spec))
        out["samples"] = samples
        # STUDY.md: the generator's own error given its decoder, apart from the decoder's share.
        out["samples_vs_reconstructions"] = _distances(recon["decoder"]["features"], fake, spec, config, full=False)
    out["reconstruction"] = {}
    for role in roles:
        distances = _distances(real, recon[role]["features"], spec, config, full=False)
        if "fid" in distances:
            distances["rfid"] = distances.pop("fid")
        out["reconstruction"][role] = {**recon[role]["metrics"], **distances}
    out["real_vs_real"] = _distances(real, recon["real"], spec, config, full=False)
    complexity = {"encoder": recon["decoder"]["encoder_complexity"]}
    complexity.update({role: recon[role]["complexity"] for role in roles})
    if generator_uri:
        complexity["generator"] = parts[0]["complexity"]
    out["complexity"] = complexity
    if "distance" in results:
        out["latent_distance"] = results["distance"]
    out["wall_seconds"] = time.time() - started
    _to_tensorboard(run, out)
    return out


def _say_if_blind(sensitivity: dict[str, dict], headline: str) -> None:
    """One line when the headline's features miss a degradation (distances not rising level by level)."""
    space = next(space for space, metric in HEADLINE_ORDER if metric == headline)
    report = sensitivity.get(space)
    if report and not report["monotone"]:
        missed = [kind for kind in DEGRADATIONS if not report[kind]["monotone"]]
        print(f"[eval] {headline}: its features do not grow steadily with {', '.join(missed)} "
              f"(eval.feature_sensitivity.{space}); read it with care", flush=True)


def _to_tensorboard(run: RunFolder, results: dict) -> None:
    """Scalars under eval/... in `<run>/tensorboard/eval`, beside the stages' curves (local runs)."""
    if not run.is_local:
        return
    from torch.utils.tensorboard import SummaryWriter

    def flat(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{key}", value

    with SummaryWriter(run.child("tensorboard", "eval")) as writer:
        for tag, value in flat({k: v for k, v in results.items() if k != "features"}, "eval/"):
            writer.add_scalar(tag, value, 0)
