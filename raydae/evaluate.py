"""`raydae eval RUN_DIR`: sample quality, reconstruction, complexity and the latent–data distance of a run.

The heavy parts run as Ray tasks with the run's per-worker resources (a GPU each when the run trained
on GPUs), side by side: samples are drawn in `eval.sample_tasks` chunks, the held-out images are
reconstructed by every decoder, and the latent–data distance is estimated. Each task embeds its images
in every feature space and returns features only; the driver computes the distances.

Feature spaces, and so metric names (a distance on random-network features is not FID):
    inception  torchmetrics' Inception from a verified local file  -> fid, kid, is, precision_inception ...
    shapesclf  a classifier the project trains on builtin:shapes    -> fd_shapesclf, kd_shapesclf ...
    randfeat   a fixed, seeded random conv net (always)             -> fd_randfeat, kd_randfeat ...
Real-image features are cached per data set and feature network under `<storage>/eval_cache/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from raydae.config import Config
from raydae.data.images import model_input
from raydae.errors import UserError
from raydae.storage import RunFolder

RANDFEAT, CLASSIFIER, INCEPTION = "randfeat", "shapesclf", "inception"
CACHE_FOLDER = "eval_cache"
# The metric that heads tables and sweeps: the best-founded feature space present.
HEADLINE_ORDER = ((INCEPTION, "fid"), (CLASSIFIER, "fd_shapesclf"), (RANDFEAT, "fd_randfeat"))
CLASSIFIER_IMAGES = (10000, 2000)  # train / val images the shapes classifier learns from and is checked on


def metric_name(kind: str, space: str) -> str:
    """`fd`/`kd`/`precision`/`recall` in `space` -> its key: Inception's are FID/KID, the others say their features."""
    if space == INCEPTION and kind in ("fd", "kd"):
        return {"fd": "fid", "kd": "kid"}[kind]
    return f"{kind}_{space}"


# ------------------------------------------------------------------------------- feature networks
@dataclass
class FeatureSpec:
    """What every task needs to build the same feature networks (small and picklable)."""

    randfeat_seed: int
    randfeat_dim: int
    classifier: bytes | None  # a saved classifier (raydae.eval.classifier) for builtin:shapes
    inception_path: str | None  # a verified weights file; must be readable on every node

    @property
    def spaces(self) -> list[str]:
        return [s for s, on in ((INCEPTION, self.inception_path), (CLASSIFIER, self.classifier), (RANDFEAT, True)) if on]

    def identity(self) -> str:
        """Changes whenever a feature network changes: keys the real-feature cache."""
        digest = hashlib.sha256(f"{self.randfeat_seed}:{self.randfeat_dim}:{self.inception_path}".encode())
        digest.update(self.classifier or b"")
        return digest.hexdigest()[:12]


class Embedder:
    """Images in [-1, 1] -> features in every space of the spec (+ Inception logits, classifier predictions)."""

    def __init__(self, spec: FeatureSpec, device: torch.device):
        from raydae.eval import RandomFeatureNet

        self.device = device
        self.randfeat = RandomFeatureNet(spec.randfeat_seed, spec.randfeat_dim).to(device)
        self.classifier = None
        if spec.classifier is not None:
            from raydae.eval.classifier import load_classifier

            self.classifier, _ = load_classifier(io.BytesIO(spec.classifier))
            self.classifier.to(device).eval()
        self.inception = None
        if spec.inception_path:
            from raydae.eval.inception import InceptionFeatures

            self.inception = InceptionFeatures(spec.inception_path).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        images = images.to(self.device, torch.float32).clamp(-1, 1)
        out = {RANDFEAT: self.randfeat(images)}
        if self.classifier is not None:
            out[CLASSIFIER] = self.classifier.features(images)
            out["shapesclf_class"] = self.classifier(images).argmax(dim=1)
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


def reconstruct_and_measure(checkpoints: dict[str, str], image_set, limit: int, spec: FeatureSpec, batch_size: int,
                            lipschitz_latents: int, seed: int, *, use_gpu: bool) -> dict:
    """Held-out images through every decoder: MSE/PSNR/SSIM, features of the reconstructions, complexity.

    `checkpoints` maps a role (aux_decoder, decoder) to the stage checkpoint that trained it. The held-out
    real images' features come back too (`real`), for the real-vs-real floor.
    """
    from raydae.eval.complexity import (
        empirical_lipschitz,
        flops_per_image,
        lipschitz_blockers,
        spectral_norm_product,
    )
    from raydae.models import count_parameters
    from raydae.sampling import load_task
    from raydae.tasks import run_bottleneck

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
    from raydae.eval.complexity import lipschitz_upper_bound

    return lipschitz_upper_bound(decoder, tuple(latent_shape))


def sample_and_embed(generator_uri: str, start: int, count: int, seed: int, spec: FeatureSpec, batch_size: int,
                     measure_complexity: bool, *, use_gpu: bool) -> dict:
    """Samples `start .. start+count` of the evaluation set; seeds depend only on (seed, index of the chunk)."""
    from raydae.eval.complexity import count_flops
    from raydae.models import count_parameters
    from raydae.sampling import load_generator

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


def train_shapes_classifier(train, val, num_classes: int, steps: int, seed: int, *, use_gpu: bool,
                            limit: int = CLASSIFIER_IMAGES[0]) -> tuple[bytes, dict]:
    from raydae.eval.classifier import save_classifier, train_classifier

    device = _device(use_gpu)

    def load(image_set, n):
        n = min(n, len(image_set["image"]))
        return model_input(torch.tensor(image_set["image"][:n])), torch.tensor(image_set["label"][:n])

    x, y = load(train, limit)
    model, info = train_classifier(x, y, num_classes, steps=steps, seed=seed, val=load(val, CLASSIFIER_IMAGES[1]),
                                   device=device)
    buffer = io.BytesIO()
    save_classifier(model.cpu(), buffer, info)
    return buffer.getvalue(), info


def latent_distance(autoencoder_uri: str, train, val, limit: int, steps: int, critic_steps: int, seed: int, *,
                    use_gpu: bool) -> dict:
    """docs/latent_distance.md: the final decoder's class trained on the frozen latents against a fixed critic."""
    from raydae.eval.latent_distance import estimate_latent_distance
    from raydae.models import build_decoder
    from raydae.sampling import load_task
    from raydae.tasks import run_bottleneck

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
    from raydae.latents import data_fingerprint

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
    """The feature networks of this evaluation, and their descriptions for metrics.json."""
    from raydae.eval.inception import RESIZE, resolve_inception_weights

    ev = config.eval
    inception = resolve_inception_weights(ev.inception_weights, ev.inception_sha256)
    described = {RANDFEAT: f"RandomFeatureNet(seed={ev.randfeat_seed}, dim={ev.randfeat_dim}): fixed random "
                           "conv features; comparable only between runs scored with the same seed and dim"}
    if inception:
        described[INCEPTION] = f"Inception-v3 pool3 (2048), weights {inception}; resize {RESIZE}"
    classifier = None
    if config.data.source.strip() == "builtin:shapes" and ev.classifier_steps > 0:
        name = f"classifier-{_data_key(config, ev.classifier_steps, ev.seed)}.pt"
        if cache.exists(name):
            classifier = cache.read_bytes(name)
            info = json.loads(cache.read_text(name + ".json"))
        else:
            t0 = time.time()
            classifier, info = run_task(train_shapes_classifier, images["train"], images["val"], num_classes,
                                      ev.classifier_steps, ev.seed)
            cache.write_bytes(name, classifier)
            cache.write_text(name + ".json", json.dumps(info, indent=2))
            print(f"[eval] trained the shapes classifier in {time.time() - t0:.0f}s "
                  f"(val accuracy {info.get('val_accuracy', float('nan')):.3f}); cached in {cache.child(name)}",
                  flush=True)
        accuracy = info.get("val_accuracy", float("nan"))
        described[CLASSIFIER] = (f"penultimate features of raydae's shapes classifier ({ev.classifier_steps} steps, "
                                 f"val accuracy {accuracy:.3f})")
        if not accuracy >= ev.min_classifier_accuracy:
            print(f"[eval] the shapes classifier reached only {accuracy:.3f} val accuracy (< eval.min_classifier_"
                  f"accuracy {ev.min_classifier_accuracy}); not scoring in its feature space. More data or "
                  "eval.classifier_steps would help", flush=True)
            described[CLASSIFIER] = f"not used: {described[CLASSIFIER]} is below eval.min_classifier_accuracy"
            classifier = None
    spec = FeatureSpec(ev.randfeat_seed, ev.randfeat_dim, classifier, inception)
    return spec, described


def _distances(real: dict, fake: dict, spec: FeatureSpec, config: Config, full: bool) -> dict:
    """Every distance between two embedded sets, in every space, under its proper name."""
    from raydae.eval import frechet_distance, kernel_distance, precision_recall

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


def _class_metrics(real: dict, fake: dict, label_names: list[str]) -> dict:
    if "shapesclf_class" not in fake:
        return {}
    from raydae.eval.classifier import kl_divergence

    k = len(label_names)
    fake_hist = np.bincount(fake["shapesclf_class"], minlength=k) / len(fake["shapesclf_class"])
    real_hist = np.bincount(real["shapesclf_class"], minlength=k) / len(real["shapesclf_class"])
    out = {"class_fractions": {name: float(f) for name, f in zip(label_names, fake_hist)},
           "class_kl_to_real": float(kl_divergence(torch.tensor(fake_hist), torch.tensor(real_hist)))}
    if "requested_class" in fake:
        out["conditional_accuracy"] = float((fake["shapesclf_class"] == fake["requested_class"]).mean())
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
    from raydae.eval.inception import inception_score

    ev, scaling = config.eval, config.scaling
    started = time.time()
    options = _task_options(config)

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
    recon = results["recon"]
    parts = [results[key] for key in jobs if key.startswith("samples")]

    out: dict = {"features": described, "num_real": len(real[RANDFEAT])}
    out["headline"] = next(metric for space, metric in HEADLINE_ORDER if space in spec.spaces)
    if generator_uri:
        fake_bank = FeatureBank()
        for part in parts:
            fake_bank.add(part["features"])
        fake = fake_bank.arrays()
        samples = {"num": len(fake[RANDFEAT]), **_distances(real, fake, spec, config, full=True)}
        if INCEPTION in spec.spaces:
            samples["is"], samples["is_std"] = inception_score(torch.from_numpy(fake["inception_logits"]))
        samples.update(_class_metrics(real, fake, bundle.label_names))
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


def evaluate_folder(run_dir: str, overrides: list[str], address: str | None) -> dict:
    """`raydae eval RUN_DIR`: evaluate a finished run again and update its metrics.json."""
    import yaml

    from raydae import launch
    from raydae.config import apply_override, validate
    from raydae.data import build_datasets, check_source

    storage, _, name = run_dir.rstrip("/").rpartition("/")
    run = RunFolder(storage or ".", name)
    if not run.exists("config.yaml"):
        raise UserError(f"{run_dir}: not a raydae run folder (no config.yaml)")
    config = Config.from_dict(yaml.safe_load(run.read_text("config.yaml")))
    for item in overrides:
        if not item.startswith("eval."):
            raise UserError(f"--set {item}: `raydae eval` only takes eval.* settings (the run is already trained)")
        apply_override(config, item)
    validate(config)
    missing = [s for s in config.stages() if not run.exists(f"{s}.done.json")]
    if missing:
        raise UserError(f"{run_dir}: {', '.join(missing)} not finished; finish the run with `raydae run` first")
    check_source(config.data)
    launch.connect(address, config)
    bundle = build_datasets(config.data)
    metrics = run.read_json("metrics.json") if run.exists("metrics.json") else {}
    metrics["eval"] = evaluate_run(run, config, bundle)
    run.write_json("metrics.json", metrics)
    return metrics
