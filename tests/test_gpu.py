"""A few CUDA steps through the generator tasks: sampling runs on the GPU and a seed gives the CPU's samples.

Run with `pytest -m gpu` on a machine with a GPU; elsewhere every test here is skipped with its reason.
"""

import pytest
import torch
from torch import nn

from raydae.config import load_config
from raydae.eval.complexity import spectral_norm_product
from raydae.models.prior import build_prior
from raydae.tasks import make_task

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def generator_task(*overrides, **options):
    return make_task(load_config("tiny", overrides=list(overrides)), "generator",
                     {"latent_shape": [2, 8, 8], "num_classes": 5, **options})


def sample_on_cpu_then_cuda(task, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same weights and seed sampled on the CPU, then on the GPU."""
    task.prepare(torch.device("cpu"))
    on_cpu = task.sample(n, seed=seed)
    task.prepare(CUDA)
    on_cuda = task.sample(n, seed=seed)
    assert on_cuda.device.type == "cuda" and on_cuda.shape == (n, 3, 16, 16)
    assert torch.isfinite(on_cuda).all()
    assert torch.equal(on_cuda, task.sample(n, seed=seed))  # same seed, same images
    return on_cpu, on_cuda.cpu()


def test_dit_task_samples_on_cuda():
    task = generator_task("generator=dit", "dit.model=DiT-T/2", "dit.sample_steps=4", "dit.class_conditional=true",
                          latent_std=2.0)
    on_cpu, on_cuda = sample_on_cpu_then_cuda(task, 3, seed=1)
    # The noise is drawn on the CPU generator, so only float error (TF32 convolutions) separates the devices.
    torch.testing.assert_close(on_cuda, on_cpu, atol=2e-2, rtol=0)


def test_prior_task_samples_on_cuda():
    task = generator_task("ae.bottleneck=vq", "generator=vq_prior", "prior.model=prior-T", "prior.top_k=8",
                          "prior.class_conditional=true")
    on_cpu, on_cuda = sample_on_cpu_then_cuda(task, 3, seed=1)
    torch.testing.assert_close(on_cuda, on_cpu, atol=2e-2, rtol=0)  # one different code would move pixels by far more


def test_prior_codes_from_a_cpu_seed_are_the_same_on_cuda():
    torch.manual_seed(0)
    prior = build_prior("prior-T", 32, 12, num_classes=5).eval()
    with torch.no_grad():  # weights scaled up from the 0.02 init, so the logits are O(1) and draws are not ties
        for name, param in prior.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.15 if param.dim() > 1 else 0.1)
    y = torch.arange(4) % 5
    on_cpu = prior.generate(4, y, generator=torch.Generator().manual_seed(7))
    on_cuda = prior.to(CUDA).generate(4, y.to(CUDA), generator=torch.Generator().manual_seed(7))
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), on_cpu)
    with pytest.raises(ValueError, match="weights are on cuda"):
        prior.generate(4, y, device="cpu")


def test_spectral_norm_product_of_a_cuda_module():
    conv = nn.Conv2d(2, 4, 3, padding=1).to(CUDA)
    assert spectral_norm_product(conv, (2, 8, 8)) > 0


def _fixed_batch(n: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    smooth = nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    return {"image": smooth.to(CUDA), "label": (torch.arange(n) % 5).to(CUDA)}


def test_autoencoder_stage_learns_on_cuda_in_bf16():
    from raydae.tasks import AutoencoderTask

    config = load_config("tiny", overrides=["train.lr=0.003", "train.precision=bf16"])
    task = AutoencoderTask(config, "joint")
    task.prepare(CUDA)
    batch = _fixed_batch()
    steps = []
    for step in range(80):
        # One autocast region per step, as the loop has it: a region caches its bf16 copies of the weights,
        # so a region around several optimizer steps would train stale copies.
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            steps.append(task.train_step(batch, step))
    first, last = steps[0], steps[-1]
    assert all(v.device.type == "cuda" for v in last.values())  # logs stay on the GPU: no sync per step
    assert float(last["loss/reconstruction"]) < 0.5 * float(first["loss/reconstruction"])
    metrics = task.evaluate([batch])
    assert 0 < metrics["val/mse"] < 1


def test_dit_trains_on_cuda_compiled_fused_and_recomputed():
    task = generator_task("generator=dit", "dit.model=DiT-T/2", "dit.sample_steps=4", "dit.class_conditional=true",
                          "generator_train.lr=0.002", "generator_train.warmup_steps=0", "generator_train.compile=true",
                          "dit.activation_checkpointing=true", latent_std=1.0)
    task.prepare(CUDA)
    assert task.optimizers["generator"].defaults["fused"] is True
    g = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(16, 128, generator=g).to(CUDA), "logvar": torch.full((16, 128), -8.0, device=CUDA),
             "label": (torch.arange(16) % 5).to(CUDA)}
    first = task.evaluate([batch])["val/diffusion_loss"]
    for step in range(300):  # the first steps compile (inductor)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            logs = task.train_step(batch, step)
    assert logs["loss/total"].device.type == "cuda" and torch.isfinite(logs["loss/total"])
    task.dit_ema.load_state_dict(task.dit.state_dict())  # judge the trained weights, not the slow EMA
    assert task.evaluate([batch])["val/diffusion_loss"] < 0.8 * first
    assert not any("_orig_mod" in name for name in task.dit.state_dict())
    images = task.sample(4, seed=0)
    assert images.device.type == "cuda" and torch.isfinite(images).all()
