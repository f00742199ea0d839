"""Training logic in plain PyTorch (no Ray): what each stage trains and freezes."""

import itertools

import pytest
import torch

from raydae.checkpoints import load_state, prepare_for_training, save_training_state
from raydae.config import load_config
from raydae.loop import StepWindow, resumable_batches
from raydae.losses import equivariance_error
from raydae.tasks import AutoencoderTask, make_grid
from raydae.tasks.autoencoder import encode_images
from raydae.tasks.common import evaluation_mode


def _batch(config, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.data.image_size
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "label": torch.zeros(n, dtype=torch.long)}


def _stage1_state(config):
    stage1 = AutoencoderTask(config, "stage1")
    stage1.prepare(torch.device("cpu"))
    for step in range(3):
        stage1.train_step(_batch(config, seed=step), step)
    return {"models": {name: m.state_dict() for name, m in stage1.models.items()}}


@pytest.mark.parametrize("bottleneck", ["kl", "vq"])
def test_stage2_freezes_the_encoder_bit_for_bit(bottleneck):
    config = load_config("tiny", overrides=[f"ae.bottleneck={bottleneck}"])
    state = _stage1_state(config)
    stage2 = AutoencoderTask(config, "stage2")
    stage2.load_previous_stage(state)
    stage2.prepare(torch.device("cpu"))
    before = {k: v.clone() for k, v in stage2.encoder.state_dict().items()}
    before_bottleneck = {k: v.clone() for k, v in stage2.bottleneck.state_dict().items()}
    decoder_before = [p.clone() for p in stage2.decoder.parameters()]
    for step in range(4):
        stage2.train_step(_batch(config, seed=10 + step), step)
        # No gradient reaches the frozen encoder.
        assert all(p.grad is None for p in stage2.encoder.parameters())
        assert all(not p.requires_grad for p in stage2.encoder.parameters())
    for key, value in stage2.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert torch.equal(value, state["models"]["encoder"][key]), key  # it is stage 1's encoder
    for key, value in stage2.bottleneck.state_dict().items():  # VQ codebook (EMA buffers) frozen too
        assert torch.equal(value, before_bottleneck[key]), key
    # ... while the final decoder did train.
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, stage2.decoder.parameters()))


def test_stage1_trains_the_auxiliary_decoder_and_stage2_a_fresh_final_one():
    config = load_config("tiny", overrides=["ae.aux_decoder.width=0.5", "ae.decoder.width=1.0"])
    stage1, stage2, joint = (AutoencoderTask(config, s) for s in ("stage1", "stage2", "joint"))
    assert stage1.parameter_counts()["decoder"] < stage2.parameter_counts()["decoder"]
    assert joint.parameter_counts()["decoder"] == stage2.parameter_counts()["decoder"]
    assert stage2.frozen == {"encoder", "bottleneck"} and stage1.frozen == set() and joint.frozen == set()


def test_joint_training_updates_encoder_and_decoder():
    config = load_config("tiny", overrides=["train.mode=joint"])
    task = AutoencoderTask(config, "joint")
    task.prepare(torch.device("cpu"))
    enc = [p.clone() for p in task.encoder.parameters()]
    logs = task.train_step(_batch(config), 0)
    assert {"loss/total", "loss/reconstruction", "bottleneck/kl"} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(enc, task.encoder.parameters()))


def test_train_steps_leave_their_logs_on_the_device_and_the_window_reads_them_once():
    # A float() per step would make the host wait for the GPU at every step; the loop's window reads the sums.
    config = load_config("tiny", overrides=["train.mode=joint"])
    task = AutoencoderTask(config, "joint")
    task.prepare(torch.device("cpu"))
    window = StepWindow()
    steps = [task.train_step(_batch(config, seed=step), step) for step in range(3)]
    for logs in steps:
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in logs.values())
        window.add(logs, images=4, waiting=0.0, busy=0.1)
    means = window.means()
    assert all(type(v) is float for v in means.values())
    assert means["loss/total"] == pytest.approx(sum(float(logs["loss/total"]) for logs in steps) / 3)
    # Logs in bf16 (GAN losses under autocast) are summed in float32: in bf16, 500 ones would sum to 256.
    window = StepWindow()
    for _ in range(500):
        window.add({"loss/discriminator": torch.tensor(1.0, dtype=torch.bfloat16)}, images=4, waiting=0.0, busy=0.1)
    assert window.means()["loss/discriminator"] == 1.0


def test_reconstruction_loss_falls_on_a_fixed_batch():
    config = load_config("tiny", overrides=["train.lr=0.003"])
    task = AutoencoderTask(config, "joint")
    task.prepare(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    batch = {"image": smooth, "label": torch.zeros(4, dtype=torch.long)}
    first = task.train_step(batch, 0)["loss/reconstruction"]
    for step in range(1, 80):
        last = task.train_step(batch, step)["loss/reconstruction"]
    assert last < 0.5 * first


def test_discriminator_joins_after_its_start_step():
    config = load_config("tiny", overrides=["loss.discriminator.enabled=true", "loss.discriminator.start_step=2",
                                             "loss.discriminator.base_channels=8",
                                             "loss.discriminator.num_layers=1"])
    task = AutoencoderTask(config, "stage1")
    task.prepare(torch.device("cpu"))
    assert "loss/discriminator" not in task.train_step(_batch(config), 0)
    logs = task.train_step(_batch(config), 2)
    assert "loss/discriminator" in logs and "gan_weight" in logs
    # The adaptive weight balances two nonzero gradients at the decoder's last layer: positive and finite.
    assert 0 < logs["gan_weight"] <= 1e4 * config.loss.discriminator.weight


def test_a_resumed_stage_continues_exactly_where_its_checkpoint_left_off(tmp_path):
    """Weights and both optimizers (Adam's moments included) come back from a checkpoint: two steps, save, a
    fresh task resumed from it, two more steps equal four straight steps (same batches and noise per step)."""
    config = load_config("tiny", overrides=["train.mode=joint", "loss.discriminator.enabled=true",
                                            "loss.discriminator.start_step=0", "loss.discriminator.base_channels=8",
                                            "loss.discriminator.num_layers=1"])

    def fresh(init_seed):
        torch.manual_seed(init_seed)
        return AutoencoderTask(config, "joint")

    def train(task, steps):
        for step in steps:
            torch.manual_seed(1000 + step)  # the posterior's noise: the same per step in both runs
            task.train_step(_batch(config, n=4, seed=step), step)

    straight = fresh(0)
    straight.prepare(torch.device("cpu"))
    train(straight, range(4))
    first = fresh(0)
    first.prepare(torch.device("cpu"))
    train(first, range(2))
    save_training_state(str(tmp_path), first, config, "joint", step=2, history=[])
    resumed = fresh(1)  # other initial weights: everything must come from the checkpoint
    prepare_for_training(resumed, torch.device("cpu"), state=load_state(str(tmp_path)))
    assert set(resumed.optimizers) == {"autoencoder", "discriminator"}
    train(resumed, range(2, 4))
    for name, module in straight.models.items():
        for (key, want), got in zip(module.state_dict().items(), resumed.models[name].state_dict().values()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name}.{key}")


def test_a_resumed_stage_picks_up_the_training_data_where_its_checkpoint_left_off():
    """Passes of 3 batches; a run stopped after 4 batches (pass 1, batch 1 used) and resumed there sees what an
    uninterrupted run sees next: no repeat of a pass's start, no skipped end."""
    def open_pass(number):
        return iter([f"p{number}b{i}" for i in range(3)])  # a pass's order depends on its number alone

    straight = [batch for _, _, batch in itertools.islice(resumable_batches(open_pass), 7)]
    assert straight == ["p0b0", "p0b1", "p0b2", "p1b0", "p1b1", "p1b2", "p2b0"]
    first = list(itertools.islice(resumable_batches(open_pass), 4))
    position = {"pass": first[-1][0], "batch": first[-1][1] + 1}  # what the loop saves with its checkpoint
    assert position == {"pass": 1, "batch": 1}
    rest = [batch for _, _, batch in itertools.islice(resumable_batches(open_pass, position["pass"],
                                                                        position["batch"]), 3)]
    assert [batch for _, _, batch in first] + rest == straight
    with pytest.raises(RuntimeError, match="no batch"):
        next(resumable_batches(lambda number: iter([]), empty_error="no batch"))


EQUIVARIANCE_ON = ["loss.equivariance.weight=1.0", "loss.equivariance.probability=1.0"]


def _smooth_batch(n, seed):
    """Smooth images (upsampled 4x4 noise) that a tiny autoencoder learns within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    return {"image": images, "label": torch.zeros(n, dtype=torch.long)}


def _task_after_one_step(config, stage):
    torch.manual_seed(0)  # same initial weights (stage 2: the same frozen encoder) and KL noise for both runs
    task = AutoencoderTask(config, stage)
    task.prepare(torch.device("cpu"))
    return task, task.train_step(_batch(config), 0)


@pytest.mark.parametrize("bottleneck", ["kl", "vq"])
@pytest.mark.parametrize("stage", ["stage1", "stage2", "joint"])
def test_equivariance_term_trains_the_encoder_except_in_stage2(stage, bottleneck):
    mode = "joint" if stage == "joint" else "dae"
    base = [f"ae.bottleneck={bottleneck}", f"train.mode={mode}"]
    plain_config = load_config("tiny", overrides=base)
    eq_config = load_config("tiny", overrides=base + EQUIVARIANCE_ON)
    plain, plain_logs = _task_after_one_step(plain_config, stage)
    regularised, logs = _task_after_one_step(eq_config, stage)
    assert "loss/equivariance" not in plain_logs
    assert 0.01 < logs["loss/equivariance"] < 10
    assert logs["loss/total"] > plain_logs["loss/total"]
    changed = {
        name: any(not torch.equal(a, b) for a, b in zip(plain.models[name].parameters(),
                                                         regularised.models[name].parameters()))
        for name in ("encoder", "decoder")
    }
    # The term moves the decoder always, the encoder only where it trains (stage 2 decodes frozen latents).
    assert changed == {"encoder": stage != "stage2", "decoder": True}
    if stage == "stage2":
        assert all(p.grad is None for p in regularised.encoder.parameters())


def _equivariance_after_training(overrides, steps=20):
    config = load_config("tiny", overrides=["train.lr=0.003", "train.mode=joint", *overrides])
    torch.manual_seed(0)
    task = AutoencoderTask(config, "joint")
    task.prepare(torch.device("cpu"))
    batch = _smooth_batch(8, seed=0)
    logs = [task.train_step(batch, step) for step in range(steps)]

    def encode(images):
        return encode_images(task.encoder, task.bottleneck, images).z  # the KL mean

    held_out = _smooth_batch(16, seed=1)["image"]
    with evaluation_mode(*task.models.values()):
        return equivariance_error(encode, task.decoder, held_out, scales=[0.5, 0.75], rotations=True), logs


def test_joint_training_with_the_term_lowers_the_equivariance_error():
    without, _ = _equivariance_after_training([])
    with_term, logs = _equivariance_after_training(EQUIVARIANCE_ON)
    assert all(0.0 < step["loss/equivariance"] < 10 for step in logs)
    # The gap between transformed and plain reconstruction is what the term targets (measured ~0.03 -> ~0.002).
    gap_without = without["decoder_error"] - without["reconstruction_error"]
    gap_with = with_term["decoder_error"] - with_term["reconstruction_error"]
    assert gap_without > 0.01 and gap_with < 0.5 * gap_without
    assert with_term["encoder_error"] < 0.9 * without["encoder_error"]  # the encoder learns it too


def test_warm_start_needs_matching_decoder_shapes():
    from raydae.errors import UserError

    with pytest.raises(UserError, match="warm_start_decoder"):  # caught when the config loads
        load_config("tiny", overrides=["train.warm_start_decoder=true"])
    mismatched = load_config("tiny")  # the task checks too, for a stage-1 state from elsewhere
    mismatched.train.warm_start_decoder = True
    with pytest.raises(UserError, match="warm_start_decoder"):
        AutoencoderTask(mismatched, "stage2").load_previous_stage(_stage1_state(load_config("tiny")))
    same = load_config("tiny", overrides=["train.warm_start_decoder=true", "ae.aux_decoder.width=1.0",
                                          "ae.aux_decoder.dropout=0.2"])
    state = _stage1_state(same)
    task = AutoencoderTask(same, "stage2")
    task.load_previous_stage(state)
    for key, value in task.decoder.state_dict().items():
        assert torch.equal(value, state["models"]["decoder"][key])


def test_evaluate_reports_mse_psnr_ssim_consistently():
    config = load_config("tiny")
    task = AutoencoderTask(config, "joint")
    task.prepare(torch.device("cpu"))
    metrics = task.evaluate([_batch(config, 8, seed=1), _batch(config, 4, seed=2)])
    assert metrics["val/images"] == 12
    assert metrics["val/mse"] > 0
    assert -1 <= metrics["val/ssim"] <= 1
    # PSNR on [0, 1] images is -10 log10(MSE) when computed over the whole set.
    assert metrics["val/psnr"] == pytest.approx(-10 * torch.log10(torch.tensor(metrics["val/mse"])).item(), rel=1e-4)


def test_make_grid_tiles_row_by_row_in_unit_range():
    shades = torch.linspace(-1, 1, 6)
    grid = make_grid(shades.view(6, 1, 1, 1).expand(6, 3, 4, 4), nrow=3, pad=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    corners = [grid[:, 1 + row * 5, 1 + col * 5] for row in range(2) for col in range(3)]
    torch.testing.assert_close(torch.stack(corners), ((shades[:, None] + 1) / 2).expand(6, 3))
    assert (grid[:, 0, :] == 1).all() and (grid[:, :, 5] == 1).all()  # white gaps between tiles


def test_image_grid_tiles_inputs_over_reconstructions():
    config = load_config("tiny")
    task = AutoencoderTask(config, "joint")
    task.prepare(torch.device("cpu"))
    batch, size, pad = _batch(config, n=3), config.data.image_size, 2
    grid = task.image_grid(batch)
    assert grid.shape == (3, 2 * (size + pad) + pad, 3 * (size + pad) + pad)
    with evaluation_mode(*task.models.values()):
        recon, _ = task.reconstruct_unwrapped(batch["image"])

    def tile(row, col):
        top, left = pad + row * (size + pad), pad + col * (size + pad)
        return grid[:, top: top + size, left: left + size]

    for i in range(3):
        torch.testing.assert_close(tile(0, i), (batch["image"][i] + 1) / 2)  # the inputs on the top row
        torch.testing.assert_close(tile(1, i), ((recon[i] + 1) / 2).clamp(0, 1))  # their reconstructions below
        assert not torch.allclose(tile(0, i), tile(1, i))


def test_tensorboard_events_are_copied_for_remote_storage(tmp_path):
    """Rank 0 uploads its event files through pyarrow.fs (here to a local path standing in for s3://)."""
    from torch.utils.tensorboard import SummaryWriter

    from raydae.loop import _upload_tensorboard

    writer = SummaryWriter(str(tmp_path / "local"))
    writer.add_scalar("x", 1.0, 0)
    _upload_tensorboard(writer, str(tmp_path / "remote" / "stage1"))
    writer.close()
    assert list((tmp_path / "remote" / "stage1").glob("events.out.tfevents.*"))


def test_cosine_schedule_warms_up_then_decays_to_zero_and_constant_stays_flat():
    from raydae.tasks import warmup_scale

    cosine = [warmup_scale(step, 10, 110, "cosine") for step in range(110)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[60] == pytest.approx(0.5) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))  # monotone decay after the warm-up
    assert [warmup_scale(step, 10, 110) for step in (9, 60, 109)] == [1.0, 1.0, 1.0]
