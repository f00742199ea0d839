"""Scoring a finished run (evaluation's driver): sample quality, reconstructions, complexity, latent–data distance.

Runs at the end of `raydae run` and for `raydae eval`. The heavy parts run as Ray tasks (their bodies are
`scoring_tasks.py`) with the run's per-worker resources (a GPU each when the run trained on GPUs), side by
side: samples are drawn in `eval.sample_tasks` chunks, the held-out images are reconstructed by every
decoder, and the latent–data distance is estimated. Each task embeds its images in every feature space
(`eval/spaces.py`) and returns features only; the driver computes the distances here.

Each space's sensitivity to blur, noise and patch shuffling is measured once on the real images
(eval/sensitivity.py). Real-image features, trained networks and sensitivities are cached per data set
and feature network under `<storage>/eval_cache/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import torch

from raydae.config import Config
from raydae.errors import UserError
from raydae.eval.classifier import kl_divergence
from raydae.eval.distances import frechet_distance, kernel_distance, precision_recall
from raydae.eval.inception import RESIZE, inception_score, resolve_inception_weights
from raydae.eval.sensitivity import DEGRADATIONS
from raydae.eval.spaces import (
    DATA_CLASSIFIER,
    INCEPTION,
    RANDFEAT,
    SELFSUP,
    SHAPES_CLASSIFIER,
    FeatureBank,
    FeatureSpec,
    headline_metric,
    headline_space,
    metric_name,
    trained_space,
)
from raydae.latents import data_fingerprint
from raydae.metrics_json import flatten_numbers
from raydae.progress import EVERY_S, Progress, format_seconds, heartbeat, say
from raydae.scoring_tasks import (
    CLASSIFIER_IMAGES,
    embed_real,
    latent_distance,
    measure_sensitivity,
    reconstruct_and_measure,
    sample_and_embed,
    train_feature_classifier,
    train_selfsup,
)
from raydae.storage import RunFolder

CACHE_FOLDER = "eval_cache"
# Shapes keep their class upside down; photos mostly do not (an upside-down image is off the data), so other
# data sets get left-right flips only.
CLASSIFIER_FLIPS = {SHAPES_CLASSIFIER: "hv", DATA_CLASSIFIER: "h"}
WEAK_FALLBACK = ("fixed random conv features: a weak fallback, nearly blind to blur and noise (see "
                 "feature_sensitivity); comparable only between runs scored with the same seed and dim")


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


def sample_chunks(num_samples: int, tasks: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, count) of each sampling task: about num_samples / tasks each, starting at multiples of the batch
    size, so every batch (seeded by its first index) is the same however many tasks draw the samples."""
    size = -(-num_samples // max(1, tasks))
    size = -(-size // batch_size) * batch_size
    return [(start, min(size, num_samples - start)) for start in range(0, num_samples, size)]


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


def feature_spec(config: Config, cache: RunFolder, images: dict, num_classes: int,
                 run_and_wait) -> tuple[FeatureSpec, dict]:
    """The feature networks of this evaluation, and their descriptions for metrics.json.

    `run_and_wait(fn, *args)` runs a training function and returns its result (a Ray task in evaluation);
    trained networks are cached.
    """
    ev = config.eval
    inception = resolve_inception_weights(ev.inception_weights, ev.inception_sha256)
    described = {RANDFEAT: f"RandomFeatureNet(seed={ev.randfeat_seed}, dim={ev.randfeat_dim}): {WEAK_FALLBACK}"}
    if inception:
        described[INCEPTION] = f"Inception-v3 pool3 (2048), weights {inception}; resize {RESIZE}"
    space = trained_space(config.data.source, num_classes, ev.classifier_steps)
    classifier = selfsup = None
    if space in (SHAPES_CLASSIFIER, DATA_CLASSIFIER):
        classifier, described[space] = _trained_classifier(config, cache, images, num_classes, space, run_and_wait)
        if classifier is None:  # too weak to measure anything: the self-supervised net scores instead
            space = SELFSUP
    if space == SELFSUP:
        selfsup, described[SELFSUP] = _trained_selfsup(config, cache, images, run_and_wait)
    spec = FeatureSpec(ev.randfeat_seed, ev.randfeat_dim, classifier, inception,
                       classifier_space=space if classifier else SHAPES_CLASSIFIER, selfsup=selfsup)
    return spec, described


def _cached_training(cache: RunFolder, name: str, run_and_wait, fn, *args) -> tuple[bytes, dict, bool]:
    """A trained network's bytes and info from the cache, or trained now and cached: (bytes, info, trained)."""
    if cache.exists(name):
        return cache.read_bytes(name), json.loads(cache.read_text(name + ".json")), False
    data, info = run_and_wait(fn, *args)
    cache.write_bytes(name, data)
    cache.write_text(name + ".json", json.dumps(info, indent=2))
    return data, info, True


def _trained_classifier(config: Config, cache: RunFolder, images: dict, num_classes: int, space: str,
                        run_and_wait) -> tuple[bytes | None, str]:
    """The classifier of `space` (None when below eval.min_classifier_accuracy) and its description."""
    ev, flips = config.eval, CLASSIFIER_FLIPS[space]
    # builtin:shapes keeps its key (and so the classifiers already cached); other data adds the flips.
    key = _data_key(config, ev.classifier_steps, ev.seed) if space == SHAPES_CLASSIFIER \
        else _data_key(config, ev.classifier_steps, ev.seed, space, flips)
    name = f"classifier-{key}.pt"
    what = "shapes" if space == SHAPES_CLASSIFIER else "data"
    t0 = time.time()
    classifier, info, trained = _cached_training(cache, name, run_and_wait, train_feature_classifier, images["train"],
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


def _trained_selfsup(config: Config, cache: RunFolder, images: dict, run_and_wait) -> tuple[bytes, str]:
    """The self-supervised network (raydae.eval.selfsup) and its description."""
    ev = config.eval
    name = f"selfsup-{_data_key(config, ev.classifier_steps, ev.seed, SELFSUP)}.pt"
    t0 = time.time()
    net, info, trained = _cached_training(cache, name, run_and_wait, train_selfsup, images["train"], images["val"],
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


def run_bounded(jobs: dict, limit: int, ray_options: dict, labels: dict | None = None, **kwargs) -> dict:
    """Run `{key: (fn, *args)}` as Ray tasks, at most `limit` at a time; returns `{key: result}`.

    Says when each task starts and ends (`labels[key]` says what it does), and every `progress.EVERY_S`
    seconds which are still running."""
    import ray

    labels = labels or {}
    progress = Progress("eval", "evaluation tasks", total=len(jobs), unit="done", every_s=EVERY_S, announce=False)
    queue, running, started, results = list(jobs.items()), {}, {}, {}
    while queue or running:
        while queue and len(running) < limit:
            key, (fn, *args) = queue.pop(0)
            running[ray.remote(**ray_options)(fn).remote(*args, **kwargs)] = key
            started[key] = time.monotonic()
            say("eval", f"started {labels.get(key, key)}")
        done, _ = ray.wait(list(running), num_returns=1, timeout=EVERY_S)
        if not done:
            now = time.monotonic()
            busy = ", ".join(f"{labels.get(key, key)} ({format_seconds(now - started[key])})" for key in running.values())
            progress.tick(f"running: {busy}")
            continue
        key = running.pop(done[0])
        results[key] = ray.get(done[0])
        progress.done += 1
        say("eval", f"finished {labels.get(key, key)} in {format_seconds(time.monotonic() - started[key])} "
                    f"({progress.status()})")
    return results


def _job_labels(config: Config, jobs: dict) -> dict[str, str]:
    """What each evaluation task does, in words, for its progress lines."""
    ev = config.eval
    labels = {"recon": f"reconstructing {ev.num_reconstructions} held-out images with each decoder",
              "real": f"embedding {ev.num_real} real images",
              "sensitivity": "measuring the feature spaces' sensitivity to blur, noise and patch shuffling",
              "distance": f"estimating the latent-data distance ({ev.latent_distance_steps} steps)"}
    for key, job in jobs.items():
        if key.startswith("samples"):
            start, count = job[2], job[3]
            labels[key] = f"drawing and embedding samples {start}-{start + count - 1} of {ev.num_samples}"
    return labels


def _ray_task_options(config: Config) -> dict:
    """Ray task options of evaluation: the run's per-worker resources, outside any trial's placement group."""
    scaling = config.scaling
    # "DEFAULT" scheduling: inside a sweep trial, tasks would otherwise be captured by the trial's tiny
    # placement group, where they cannot fit.
    return {"num_cpus": scaling.cpus_per_worker, "num_gpus": scaling.gpus_per_worker if scaling.use_gpu else 0,
            "scheduling_strategy": "DEFAULT"}


def _run_and_wait(config: Config):
    """`run_and_wait(fn, *args)`: runs one Ray task with evaluation's resources and blocks until it returns."""
    import ray

    ray_options = _ray_task_options(config)

    def run_and_wait(fn, *args):
        ref = ray.remote(**ray_options)(fn).remote(*args, use_gpu=config.scaling.use_gpu)
        return heartbeat("eval", fn.__name__.replace("_", " "), lambda: ray.get(ref))

    return run_and_wait


def _shared_images(config: Config, bundle) -> dict:
    """Every image any evaluation task needs, read once by the driver and shared through the object store."""
    import ray

    ev = config.eval
    train_needed = max(ev.num_real, ev.latent_distance_images if ev.latent_distance_steps > 0 else 0,
                       CLASSIFIER_IMAGES[0] if ev.classifier_steps > 0 else 0)
    val_needed = max(ev.num_reconstructions, ev.latent_distance_images // 4,
                     CLASSIFIER_IMAGES[1] if ev.classifier_steps > 0 else 0)
    say("eval", f"reading up to {train_needed} train and {val_needed} held-out images for evaluation")
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
    run_and_wait = _run_and_wait(config)
    images = _shared_images(config, bundle)
    spec, _ = feature_spec(config, cache, images, len(bundle.label_names), run_and_wait)
    name = _real_cache_name(config, spec)
    if cache.exists(name):
        return spec, _load_arrays(cache.read_bytes(name))
    real = run_and_wait(embed_real, images["train"], config.eval.num_real, spec, config.eval.batch_size)
    cache.write_bytes(name, _save_arrays(real))
    return spec, real


def evaluate_run(run: RunFolder, config: Config, bundle) -> dict:
    """Everything `eval` measures for a run whose stages (and generator) finished. Ray must be up."""
    ev, scaling = config.eval, config.scaling
    started = time.time()
    sensitivity_count = _sensitivity_images(config)

    # At most one task per slot the run trained with (its workers plus the one Ray Data used): a sweep's
    # embedded cluster is sized for exactly that, and a finished trial's evaluation must not starve the
    # trial still training beside it.
    slots = scaling.num_workers + 1
    images = _shared_images(config, bundle)
    cache = RunFolder(run.storage, CACHE_FOLDER)
    spec, described = feature_spec(config, cache, images, len(bundle.label_names), _run_and_wait(config))

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
        chunks = sample_chunks(ev.num_samples, ev.sample_tasks or scaling.num_workers, ev.batch_size)
        for i, (start, count) in enumerate(chunks):
            jobs[f"samples{i}"] = (sample_and_embed, generator_uri, start, count, ev.seed, spec, ev.batch_size, i == 0)
    if ev.latent_distance_steps > 0:
        jobs["distance"] = (latent_distance, roles["decoder"], images["train"], images["val"],
                            ev.latent_distance_images, ev.latent_distance_steps,
                            ev.latent_distance_critic_steps, ev.seed)

    say("eval", f"{len(jobs)} tasks, at most {slots} at a time")
    results = run_bounded(jobs, slots, _ray_task_options(config), _job_labels(config, jobs), use_gpu=scaling.use_gpu)
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
        _say_if_blind(out["feature_sensitivity"], spec.spaces)
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
        # The generator's own error given its decoder, apart from the decoder's share.
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


def _say_if_blind(sensitivity: dict[str, dict], spaces: list[str]) -> None:
    """One line when the headline's features miss a degradation (distances not rising level by level)."""
    space, headline = headline_space(spaces), headline_metric(spaces)
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

    scalars = flatten_numbers({k: v for k, v in results.items() if k != "features"}, "eval/", sep="/")
    with SummaryWriter(run.child("tensorboard", "eval")) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, 0)
