"""Generator tasks in plain PyTorch: they learn on fixed latents and decode samples to images."""

import pytest
import torch

from raydae.config import load_config
from raydae.tasks import AutoencoderTask, make_task


def _ae_state(config):
    task = AutoencoderTask(config, "stage2")
    return {"models": {name: m.state_dict() for name, m in task.models.items()}}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dit_task_learns_fixed_latents_and_samples_images():
    config = load_config("tiny", overrides=["generator=dit", "dit.model=DiT-T/2", "generator_train.lr=0.002", "generator_train.warmup_steps=0",
                                            "dit.sample_steps=4", "dit.class_conditional=true"])
    options = {"latent_shape": [2, 8, 8], "num_classes": 5, "latent_std": 2.0}
    task = make_task(config, "generator", options)
    task.load_previous_stage(_ae_state(config))
    task.prepare(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(8, 128, generator=g), "logvar": torch.full((8, 128), -8.0),
             "label": torch.arange(8) % 5}
    torch.manual_seed(0)
    first = task.evaluate([batch])["val/diffusion_loss"]
    for step in range(200):
        task.train_step(batch, step)
    task.dit_ema.load_state_dict(task.dit.state_dict())  # judge the trained weights, not the slow EMA
    assert task.evaluate([batch])["val/diffusion_loss"] < 0.6 * first
    images = task.sample(3, seed=1)
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, task.sample(3, seed=1))  # same seed, same images
    assert set(task.frozen) == {"decoder", "bottleneck", "dit_ema"}
    assert task.image_grid().shape[0] == 3


def test_the_dit_ema_follows_the_weights_after_each_optimizer_step_with_the_warmed_up_decay():
    """ema_t = d_t * ema_{t-1} + (1 - d_t) * weights_t, d_t = min(decay, (1 + t) / (10 + t)), from the initial
    weights: an update before the optimizer step, or a missing one, gives other numbers."""
    config = load_config("tiny", overrides=["generator=dit", "dit.model=DiT-T/2", "generator_train.warmup_steps=0"])
    task = make_task(config, "generator", {"latent_shape": [2, 8, 8], "num_classes": 1, "latent_std": 1.0})
    task.load_previous_stage(_ae_state(config))
    task.prepare(torch.device("cpu"))
    batch = {"mean": torch.randn(4, 128, generator=torch.Generator().manual_seed(0)),
             "logvar": torch.full((4, 128), -8.0), "label": torch.zeros(4, dtype=torch.long)}
    expected = {name: p.detach().clone() for name, p in task.dit.named_parameters()}
    for step in range(3):
        task.train_step(batch, step)
        decay = min(config.dit.ema_decay, (1 + step) / (10 + step))
        for name, p in task.dit.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    moved = 0
    for name, p in task.dit_ema.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6)
        moved += not torch.equal(p, dict(task.dit.named_parameters())[name])
    assert moved  # the average differs from the live weights: the check is not comparing a copy with itself


def test_prior_task_learns_fixed_codes_and_samples_images():
    config = load_config("tiny", overrides=["ae.bottleneck=vq", "generator=vq_prior", "prior.model=prior-T",
                                            "generator_train.lr=0.005"])
    options = {"latent_shape": [2, 8, 8], "num_classes": 5}
    task = make_task(config, "generator", options)
    task.load_previous_stage(_ae_state(config))
    task.prepare(torch.device("cpu"))
    codes = torch.randint(0, config.ae.vq.codebook_size, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"codes": codes, "label": torch.zeros(4, dtype=torch.long)}
    first = task.evaluate([batch])["val/cross_entropy"]
    for step in range(60):
        task.train_step(batch, step)
    assert task.evaluate([batch])["val/cross_entropy"] < 0.5 * first
    images = task.sample(2, seed=3)
    assert images.shape == (2, 3, 16, 16)
    assert torch.equal(images, task.sample(2, seed=3))


def test_label_gain_is_zero_for_an_untrained_dit_and_large_once_latents_depend_on_the_label():
    config = load_config("tiny", overrides=["generator=dit", "dit.model=DiT-T/2", "generator_train.lr=0.002",
                                            "generator_train.warmup_steps=0", "dit.class_conditional=true"])
    task = make_task(config, "generator", {"latent_shape": [2, 8, 8], "num_classes": 5, "latent_std": 1.0})
    task.load_previous_stage(_ae_state(config))
    task.prepare(torch.device("cpu"))
    patterns = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 5
    batch = {"mean": patterns[labels], "logvar": torch.full((10, 128), -8.0), "label": labels}
    # adaLN-Zero: an untrained DiT predicts 0 whatever its label, so wrong labels cost exactly nothing
    assert task.evaluate([batch])["val/label_gain"] == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    for step in range(150):
        task.train_step(batch, step)
    task.dit_ema.load_state_dict(task.dit.state_dict())
    scores = task.evaluate([batch])
    assert scores["val/label_gain"] > 0.5 * scores["val/diffusion_loss"]  # the label names the latent


def test_prior_label_gain_measures_how_much_the_labels_tell():
    config = load_config("tiny", overrides=["ae.bottleneck=vq", "generator=vq_prior", "prior.model=prior-T",
                                            "generator_train.lr=0.005", "prior.class_conditional=true"])
    task = make_task(config, "generator", {"latent_shape": [2, 8, 8], "num_classes": 5})
    task.load_previous_stage(_ae_state(config))
    task.prepare(torch.device("cpu"))
    patterns = torch.randint(0, config.ae.vq.codebook_size, (5, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 5
    batch = {"codes": patterns[labels], "label": labels}
    untrained = task.evaluate([batch])["val/label_gain"]
    for step in range(60):
        task.train_step(batch, step)
    # Nats per code: the label names the first code; the codes before it name each later one, so the gain
    # is mostly that first code's, spread over 64.
    assert task.evaluate([batch])["val/label_gain"] > 0.2 > abs(untrained)


def test_generator_must_match_the_bottleneck():
    from raydae.errors import UserError

    with pytest.raises(UserError, match="generator=vq_prior needs ae.bottleneck=vq"):
        load_config("tiny", overrides=["generator=vq_prior"])


def _dit_steps(overrides: list[str], steps: int = 3) -> tuple:
    """A tiny DiT task after `steps` training steps from a fixed seed: (task, per-step losses, the batch)."""
    config = load_config("tiny", overrides=["generator=dit", "dit.model=DiT-T/2", "generator_train.warmup_steps=0",
                                            *overrides])
    torch.manual_seed(0)
    task = make_task(config, "generator", {"latent_shape": [2, 8, 8], "num_classes": 5, "latent_std": 1.0})
    task.load_previous_stage(_ae_state(config))
    task.prepare(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batch = {"mean": torch.randn(8, 128, generator=g), "logvar": torch.full((8, 128), -8.0), "label": torch.arange(8) % 5}
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same noise and timesteps in every variant
        losses.append(float(task.train_step(batch, step)["loss/total"]))
    return task, losses, batch


def test_activation_checkpointing_trains_the_same_weights():
    plain, plain_losses, batch = _dit_steps([])
    recomputed, recomputed_losses, _ = _dit_steps(["dit.activation_checkpointing=true"])
    assert recomputed_losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, a), b in zip(plain.dit.state_dict().items(), recomputed.dit.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    calls = {}
    for name, task in (("plain", plain), ("recomputed", recomputed)):
        calls[name] = 0
        block = task.dit.blocks[0]
        forward = block.forward  # wrapped, not hooked: module hooks do not fire on a checkpoint's recomputation

        def counted(*args, name=name, forward=forward):
            calls[name] += 1
            return forward(*args)
        block.forward = counted
        task.train_step(batch, 3)
    assert calls == {"plain": 1, "recomputed": 2}  # the block ran again in backward


def test_a_compiled_generator_trains_like_the_plain_one_and_checkpoints_plain_names(monkeypatch):
    # Dynamo's "eager" backend traces and guards as for a GPU but runs the captured graph as it is: the wiring
    # (what is compiled, what the checkpoint and the EMA see) is tested here without a C++ toolchain or minutes.
    real_compile = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or real_compile(module, backend="eager", **kw))
    plain, plain_losses, _ = _dit_steps([])
    task, losses, _ = _dit_steps(["generator_train.compile=true"])
    assert compiled == [task.dit] and task.trained_module is not task.dit
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    names = set(task.dit.state_dict())
    assert names == set(plain.dit.state_dict()) == set(task.dit_ema.state_dict())
    assert not any("_orig_mod" in name for module in task.models.values() for name in module.state_dict())
    for name, value in task.dit_ema.state_dict().items():
        torch.testing.assert_close(value, plain.dit_ema.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
