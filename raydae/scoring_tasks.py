"""The bodies of evaluation's Ray tasks: plain functions that `scoring.py` runs as Ray tasks.

Each gets its images as arrays (never a Dataset, see docs/architecture.md), embeds them in every feature
space of a `FeatureSpec` and returns features, metrics or a trained feature network's bytes; the driver
computes the distances. No Ray here: a test can call any of them directly (`use_gpu=False`).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from raydae.checkpoints import load_generator, load_task
from raydae.devices import pick_device
from raydae.eval.classifier import save_classifier, train_classifier
from raydae.eval.complexity import (
    count_flops,
    empirical_lipschitz,
    flops_per_image,
    lipschitz_blockers,
    lipschitz_upper_bound,
    spectral_norm_product,
)
from raydae.eval.latent_distance import estimate_latent_distance
from raydae.eval.selfsup import save_degradation_estimator, train_degradation_estimator
from raydae.eval.sensitivity import feature_sensitivity
from raydae.eval.spaces import Embedder, FeatureBank, FeatureSpec
from raydae.models import build_decoder, count_parameters
from raydae.pixels import model_input
from raydae.seeds import derive_seed
from raydae.tasks import encode_images

CLASSIFIER_IMAGES = (10000, 2000)  # train / val images a trained feature network learns from and is checked on


def _images(image_set: dict[str, np.ndarray], limit: int, batch_size: int, device: torch.device):
    """Batches of {image: float in [-1, 1], label} from a collected image set."""
    count = min(limit, len(image_set["image"]))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        # Arrays from the object store are read-only; torch.tensor copies them.
        images = model_input(torch.tensor(image_set["image"][start:stop], device=device))
        yield {"image": images, "label": torch.tensor(image_set["label"][start:stop], device=device)}


# ------------------------------------------------------------------------------ the task bodies
def embed_real(image_set, limit: int, spec: FeatureSpec, batch_size: int, *, use_gpu: bool) -> dict[str, np.ndarray]:
    """Features of the first `limit` real images of a split (the reference set)."""
    embed, bank = Embedder(spec, pick_device(use_gpu)), FeatureBank()
    for batch in _images(image_set, limit, batch_size, embed.device):
        bank.add(embed(batch["image"]))
        bank.add({"label": batch["label"].cpu().numpy()})
    return bank.arrays()


def measure_sensitivity(image_set, count: int, spec: FeatureSpec, batch_size: int, seed: int, *,
                        use_gpu: bool) -> dict[str, dict]:
    """`feature_sensitivity` of every space of `spec` on the first `count` real images: {space: report}."""
    embed = Embedder(spec, pick_device(use_gpu))
    images = model_input(torch.tensor(image_set["image"][:count]))
    return feature_sensitivity(lambda x: {space: embed(x)[space] for space in spec.spaces}, images, seed=seed,
                               batch_size=batch_size)


def reconstruct_and_measure(checkpoints: dict[str, str], image_set, limit: int, spec: FeatureSpec, batch_size: int,
                            lipschitz_latents: int, seed: int, *, use_gpu: bool) -> dict:
    """Held-out images through every decoder: MSE/PSNR/SSIM, features of the reconstructions, complexity.

    `checkpoints` maps a role (aux_decoder, decoder) to the stage checkpoint that trained it. The held-out
    real images' features come back too (`real`), for the real-vs-real floor.
    """
    device = pick_device(use_gpu)
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
        encoder_flops = flops_per_image(lambda x: encode_images(task.encoder, task.bottleneck, x),
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
    """Samples `start .. start+count` of the evaluation set, a batch at a time; each batch's noise is seeded by
    (seed, its first index), so with chunks starting at multiples of `batch_size` the samples do not depend on
    how many tasks draw them."""
    device = pick_device(use_gpu)
    task = load_generator(generator_uri, device=str(device))
    embed, bank = Embedder(spec, device), FeatureBank()
    for offset in range(0, count, batch_size):
        n = min(batch_size, count - offset)
        index = start + offset
        labels = None
        if task.conditional:  # a balanced class mix over the whole evaluation set
            labels = torch.arange(index, index + n, device=device) % task.latent_facts["num_classes"]
            bank.add({"requested_class": labels.cpu().numpy()})
        images = task.sample(n, seed=derive_seed(seed, index), labels=labels)
        bank.add(embed(images))
    out = {"features": bank.arrays()}
    if measure_complexity:
        x = torch.zeros((1, *task.latent_shape), device=device)
        forward = _generator_forward(task, x)
        steps = (task.config.dit.sample_steps if task.config.generator == "dit"
                 else task.latent_shape[1] * task.latent_shape[2])
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
                                   val=_first(val, CLASSIFIER_IMAGES[1]), device=pick_device(use_gpu))
    buffer = io.BytesIO()
    save_classifier(model.cpu(), buffer, info)
    return buffer.getvalue(), info


def train_selfsup(train, val, steps: int, seed: int, *, use_gpu: bool,
                  limit: int = CLASSIFIER_IMAGES[0]) -> tuple[bytes, dict]:
    """The network of `selfsup`, trained on the real images alone; saved bytes and info."""
    model, info = train_degradation_estimator(_first(train, limit)[0], steps=steps, seed=seed,
                                              val=_first(val, CLASSIFIER_IMAGES[1])[0], device=pick_device(use_gpu))
    buffer = io.BytesIO()
    save_degradation_estimator(model.cpu(), buffer, info)
    return buffer.getvalue(), info


def latent_distance(autoencoder_uri: str, train, val, limit: int, steps: int, critic_steps: int, seed: int, *,
                    use_gpu: bool) -> dict:
    """docs/latent_distance.md: the final decoder's class trained on the frozen latents against a fixed critic."""
    device = pick_device(use_gpu)
    task = load_task(autoencoder_uri, ("stage2", "joint"), device=str(device))

    def encode(image_set, n):
        images, latents = [], []
        for batch in _images(image_set, n, 500, device):
            images.append(batch["image"].cpu())
            latents.append(encode_images(task.encoder, task.bottleneck, batch["image"]).z.cpu())
        return torch.cat(latents), torch.cat(images)

    with torch.no_grad():
        z_train, x_train = encode(train, limit)
        z_val, x_val = encode(val, max(limit // 4, 64))
    config = task.config
    result = estimate_latent_distance(
        lambda: build_decoder(config.ae, config.ae.decoder), z_train, x_train, z_val, x_val,
        decoder_steps=steps, critic_steps=critic_steps, seed=seed, device=str(device))
    return {"decoder": "decoder", **result.as_dict()}
