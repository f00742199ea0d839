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
