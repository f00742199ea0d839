"""One typed config tree for a whole run.

Sources merge left to right: dataclass defaults <- built-in preset <- user YAML files <- `--set a.b=v`.
The resolved tree is written into the run folder and stored inside every checkpoint, so a checkpoint
can rebuild its models alone (`Config.from_dict(state["config"])`).

This module imports nothing else of raydae except the error type, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from raydae.errors import UserError


# ----------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    # "builtin:shapes", an image folder (png/jpg/webp, recursive), or a folder of Parquet shards
    # written by `raydae data pack` (recognised by its manifest.json).
    source: str = "builtin:shapes"
    image_size: int = 32  # images are resized (shorter side) and centre-cropped to this square
    train_size: int = 20000  # builtin:shapes only
    val_size: int = 2000  # builtin:shapes only
    val_fraction: float = 0.1  # folders and Parquet: share of files held out, chosen by a hash of the path
    seed: int = 0  # builtin:shapes content; the split of folders does not depend on it
    on_bad_file: str = "error"  # error: stop naming the file | skip: go on and list skipped files
    max_shapes: int = 3  # builtin:shapes: one to this many shapes per image
    # Training order: blocks in a seeded random order, then a local shuffle buffer of this many rows in
    # each worker (reseeded every epoch). 0 turns shuffling off (e.g. to read a folder in file order).
    shuffle_buffer: int = 2048


# ---------------------------------------------------------------------------------- autoencoder
@dataclass
class DecoderConfig:
    """Capacity knobs. The auxiliary decoder is the same class made weaker through these."""

    width: float = 1.0  # multiplier on the autoencoder's channel widths
    num_res_blocks: int = 2  # residual blocks per resolution level
    dropout: float = 0.0  # dropout inside every residual block


@dataclass
class KLConfig:
    weight: float = 1e-3  # ~1e-3 keeps tiny latents regular enough for a tiny prior (the pilot)


@dataclass
class VQConfig:
    codebook_size: int = 512
    commitment_weight: float = 0.25
    ema: bool = True  # EMA codebook updates; False learns the codebook by gradients
    ema_decay: float = 0.99
    l2_normalize: bool = False  # cosine-similarity codes (ViT-VQGAN style)
    restart_dead_codes: bool = True
    dead_code_threshold: float = 1.0  # EMA usage count under which a code is re-seeded from the batch


@dataclass
class AutoencoderConfig:
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])  # one entry per resolution level
    downsample_factor: int = 4  # must equal 2 ** (len(channel_mults) - 1)
    num_res_blocks: int = 2  # encoder residual blocks per level
    latent_channels: int = 4
    bottleneck: str = "kl"  # kl (latent space for DiT) | vq (latent space for the VQ prior)
    kl: KLConfig = field(default_factory=KLConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # the final decoder
    # A quarter-width auxiliary decoder starved the encoder in the pilot; start near half width.
    aux_decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(width=0.5))
    # Positive control: a fixed random +-1 pattern over the latent's channels and positions, applied after
    # the bottleneck and undone before every decoder. The autoencoder trains bit for bit as without it; only the
    # generator sees a latent without spatial smoothness, which is known to be harder to model.
    sign_scramble: bool = False


# --------------------------------------------------------------------------------------- losses
@dataclass
class DiscriminatorConfig:
    enabled: bool = False
    start_step: int = 0  # within the stage that trains a decoder
    weight: float = 0.5
    adaptive_weight: bool = True  # taming-transformers' balance of GAN vs reconstruction gradients
    num_layers: int = 3
    base_channels: int = 64
    lr: float = 0.0  # 0: same as train.lr


@dataclass
class EquivarianceConfig:
    """EQ-VAE (Kouzelis et al., ICML 2025): decode(T z) should match T x for a spatial transform T."""

    weight: float = 0.0  # 0: off
    probability: float = 0.5  # share of steps on which the term trains (EQ-VAE regularises a fraction of batches)
    # Downscalings of the side; each must give a whole latent side (multiples of 1 / latent side).
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75])
    rotations: bool = True  # quarter turns of 90, 180 and 270 degrees


@dataclass
class LossConfig:
    reconstruction: str = "l1"  # l1 | l2
    # LPIPS runs only when both local files are given (no downloads): the LPIPS linear heads
    # (the `lpips` package's weights/v0.1/vgg.pth) and torchvision's VGG16 (vgg16-397923af.pth).
    lpips_weights: str = ""
    vgg16_weights: str = ""
    lpips_weight: float = 1.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)


# ------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    mode: str = "dae"  # dae: stage 1 (aux decoder) then stage 2 (frozen encoder) | joint: baseline
    stage1_steps: int = 1000
    stage2_steps: int = 1000
    # joint training runs this many steps; 0 means stage1_steps + stage2_steps ("equal total steps",
    # schedule A, docs/architecture.md). Set it to stage2_steps for schedule B (equal final-decoder steps).
    joint_steps: int = 0
    batch_size: int = 64  # global batch; each worker takes batch_size / num_workers
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at the stage's last step)
    grad_clip: float = 1.0  # 0 disables clipping
    freeze_quantizer: bool = True  # stage 2 (VQ): keep the codebook fixed with the encoder
    warm_start_decoder: bool = False  # stage 2: start the final decoder from the auxiliary one
    precision: str = "fp32"  # fp32 | bf16 (autocast; meant for GPUs)
    log_every: int = 50  # progress line and TensorBoard scalars
    image_every: int = 500  # TensorBoard image grid of inputs beside reconstructions
    checkpoint_every: int = 500  # ray.train.report with a checkpoint (each report costs ~2 s)
    keep_checkpoints: int = 2
    seed: int = 0
    # Tests only: raise inside an autoencoder stage's loop at this step on its first attempt (fault injection).
    fail_at_step: int = -1


# ----------------------------------------------------------------------------------- generators
@dataclass
class DiTConfig:
    model: str = "DiT-T/2"  # a name in raydae.models.dit.DIT_MODELS (S/B/L/XL with patch 2/4/8, tiny T/XS)
    num_timesteps: int = 1000
    schedule: str = "cosine"  # linear | cosine
    prediction: str = "v"  # eps | v (the pilot: epsilon diverged on tiny shapes latents, v was stable)
    sample_steps: int = 50  # DDIM steps
    class_conditional: bool = False
    class_dropout: float = 0.1  # label dropout, so one model serves classifier-free guidance
    cfg_scale: float = 1.0  # 1.0: no guidance
    ema_decay: float = 0.999  # sampling uses the EMA weights; warmed up as min(decay, (1+step)/(10+step))
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute


@dataclass
class PriorConfig:
    model: str = "prior-S"  # a name in raydae.models.prior.PRIOR_MODELS
    class_conditional: bool = False
    dropout: float = 0.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off


@dataclass
class GeneratorTrainConfig:
    """How the generator stage trains; the field names match TrainConfig's where they mean the same."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at the last step)
    grad_clip: float = 1.0
    compile: bool = False  # torch.compile the trained model (for GPUs: the first steps pay the compilation)
    log_every: int = 50
    image_every: int = 500  # TensorBoard grid of samples decoded by the final decoder
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_grid_samples: int = 16
    # A comparable progress signal (what sweeps prune on): at every checkpoint, draw this many samples from the
    # EMA generator with fixed noise and `probe_sample_steps` DDIM steps, decode them with the final decoder and
    # report their Fréchet distance to real images (`probe/fd`) in the evaluation's feature space. 0: off.
    probe_samples: int = 256
    probe_sample_steps: int = 10
    # Latent sets up to this size are read once by the driver (a Parquet file at a time) into Ray's object
    # store, so each epoch restarts without reading Parquet again (that restart was ~10% of a tiny DiT's step
    # time); larger sets stream from Parquet.
    cache_latents_gb: float = 4.0


# ----------------------------------------------------------------------------------- evaluation
@dataclass
class EvalConfig:
    """`raydae eval` (and the end of `raydae run`): sample quality, reconstruction, complexity.

    Changing these never invalidates a run's training: they are left out of the resume check.
    """

    enabled: bool = True  # evaluate at the end of `raydae run`
    num_samples: int = 1000  # generated images scored per run
    num_real: int = 2000  # real reference images, the first of the train split (statistics cached)
    num_reconstructions: int = 1000  # held-out (val) images reconstructed by each decoder
    batch_size: int = 250
    sample_tasks: int = 0  # Ray tasks drawing samples in parallel; 0: scaling.num_workers
    # FID/KID/IS need the Inception file torchmetrics/torch-fidelity use (weights-inception-2015-12-05-
    # 6726825d.pth), checked by its SHA-256. "": use it from torch hub's cache when it is there; without it
    # the distances are computed on random-network features and named fd_randfeat/kd_randfeat.
    inception_weights: str = ""
    inception_sha256: str = ""  # pin the file's full SHA-256; "": check the 6726825d prefix its name carries
    randfeat_seed: int = 0
    randfeat_dim: int = 256
    # Steps of the feature network raydae trains on the real images: a classifier on labelled data (shapesclf,
    # dataclf: features, class mix), else a self-supervised net (selfsup). 0: none, random features only.
    classifier_steps: int = 1500
    # A classifier below this held-out accuracy is not used (its features would measure nothing).
    min_classifier_accuracy: float = 0.6
    # Real images (of the num_real) on which each feature space's sensitivity to blur, noise and patch
    # shuffling is measured once (metrics.json eval.feature_sensitivity); 0 skips it.
    sensitivity_images: int = 1000
    knn_k: int = 3  # precision/recall manifolds
    kid_subsets: int = 10
    kid_subset_size: int = 1000  # clipped to half the smaller set, so that subsets differ (eval/distances.py)
    lipschitz_latents: int = 64  # held-out latents for the empirical Lipschitz estimate
    # Latent-data distance (docs/latent_distance.md): a decoder of this class trained on the frozen
    # latents against a critic of fixed capacity. 0 steps skips it.
    latent_distance_steps: int = 300
    latent_distance_critic_steps: int = 1000  # fewer left the critic short of its sup (docs/latent_distance.md)
    latent_distance_images: int = 4000
    # Cheap latent measures (metrics.json latent_quality) on this many held-out images, taken right after the
    # autoencoder stages, before any generator trains; 0 skips them.
    latent_quality_images: int = 512
    # ... and the held-out loss of a fixed small DiT trained this many steps on those latents
    # (latent_quality.probe_generator_loss); 0 skips it.
    latent_probe_steps: int = 200
    seed: int = 0


# ------------------------------------------------------------------------------------ resources
@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # fractional values share a GPU between small trials
    torch_threads: int = 0  # intra-op threads per worker; 0: cpus_per_worker
    max_failures: int = 2  # Ray Train FailureConfig: worker-group restarts from the latest checkpoint
    gpu_wait_s: float = 300.0  # on a connected cluster, wait this long for (autoscaled) GPUs to appear


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    # The generator trained on the final latents: dit pairs with a KL bottleneck, vq_prior with VQ.
    generator: str = "none"  # dit | vq_prior | none
    generator_train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        config = cls()
        merge_into(config, data, source="dict")
        validate(config)
        return config

    def stage_steps(self, stage: str) -> int:
        train = self.train
        if stage == "stage1":
            return train.stage1_steps
        if stage == "stage2":
            return train.stage2_steps
        if stage == "joint":
            return train.joint_steps or (train.stage1_steps + train.stage2_steps)
        if stage == "generator":
            return self.generator_train.steps
        raise ValueError(f"unknown stage {stage!r}")

    def stages(self) -> list[str]:
        return ["stage1", "stage2"] if self.train.mode == "dae" else ["joint"]


# ---------------------------------------------------------------------------------- loading
def preset_names() -> list[str]:
    folder = resources.files("raydae") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{where}: not valid YAML ({err.__class__.__name__}: {err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of config sections at the top level")
    return data


def load_config(
    preset: str | None = None, files: list[str] | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults <- preset <- files (left to right) <- `a.b=value` overrides, then validated."""
    config = Config()
    if preset:
        names = preset_names()
        if preset not in names:
            raise UserError(f"unknown preset {preset!r}{_suggest(preset, names)}; presets: {', '.join(names)}")
        text = (resources.files("raydae") / "presets" / f"{preset}.yaml").read_text()
        merge_into(config, _read_yaml(text, f"preset {preset}"), source=f"preset {preset}")
    for path in files or []:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist; check the --config path")
        merge_into(config, _read_yaml(p.read_text(), path), source=path)
    for item in overrides or []:
        apply_override(config, item)
    validate(config)
    return config


def apply_override(config: Config, item: str) -> None:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ae.latent_channels=8")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            prefix = ".".join(parts[:depth])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            raise UserError(f"--set: unknown config key {key!r}{_suggest(key, full)}")
        if depth == len(parts) - 1:
            hint = _field_type(type(node), part)
            if dataclasses.is_dataclass(hint):
                raise UserError(f"--set {key}: is a section; set one of its fields, e.g. {key}.{names[0]}")
            value = raw if hint is str else _parse_scalar(raw)
            setattr(node, part, coerce(value, hint, key))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise UserError(f"--set: {'.'.join(parts[:depth + 1])} is a value, not a section")


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def merge_into(node: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Recursively set dataclass fields from a nested mapping, checking names and types."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix or 'top level'} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(node)]
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            raise UserError(f"{source}: unknown config key {path!r}{_suggest(path, full)}")
        hint = _field_type(type(node), key)
        if dataclasses.is_dataclass(hint):
            merge_into(getattr(node, key), value, source, path)
        else:
            setattr(node, key, coerce(value, hint, path))


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the field type `hint`; ints widen to floats, nothing else is guessed."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"config {path}: expected a list of {_TYPE_NAMES[item_type][3:]}s, got {value!r}")
        return [coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string; accept real numbers
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config field type {hint} at {path}")
    raise UserError(f"config {path}: expected {_TYPE_NAMES[hint]}, got {value!r} ({type(value).__name__})")


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    if not close:  # match on the last part alone, e.g. "ae.latent_chanels" vs "ae.latent_channels"
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        tail = difflib.get_close_matches(word.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.5)
        close = [tails[tail[0]]] if tail else []
    return f" (did you mean {close[0]!r}?)" if close else ""


# -------------------------------------------------------------------------------- validation
_CHOICES = {
    "data.on_bad_file": ("error", "skip"),
    "ae.bottleneck": ("kl", "vq"),
    "loss.reconstruction": ("l1", "l2"),
    "train.mode": ("dae", "joint"),
    "train.precision": ("fp32", "bf16"),
    "train.lr_schedule": ("constant", "cosine"),
    "generator_train.lr_schedule": ("constant", "cosine"),
    "dit.schedule": ("linear", "cosine"),
    "dit.prediction": ("eps", "v"),
}
_GENERATOR_FOR_BOTTLENECK = {"dit": "kl", "vq_prior": "vq"}


def validate(config: Config) -> None:
    for path, choices in _CHOICES.items():
        section, name = path.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise UserError(f"config {path}: {value!r} is not one of {', '.join(choices)}")
    if config.generator not in ("none", *_GENERATOR_FOR_BOTTLENECK):
        raise UserError(f"config generator: {config.generator!r} is not one of dit, vq_prior, none")
    wanted = _GENERATOR_FOR_BOTTLENECK.get(config.generator)
    if wanted and config.ae.bottleneck != wanted:
        raise UserError(
            f"config generator={config.generator} needs ae.bottleneck={wanted}, but ae.bottleneck="
            f"{config.ae.bottleneck}; DiT models KL latents and the VQ prior models VQ codes"
        )
    ae = config.ae
    levels = len(ae.channel_mults)
    if levels < 1:
        raise UserError("config ae.channel_mults: needs at least one level")
    if ae.downsample_factor != 2 ** (levels - 1):
        raise UserError(
            f"config ae.downsample_factor={ae.downsample_factor} does not match ae.channel_mults "
            f"({levels} levels give factor {2 ** (levels - 1)}); give one mult per level"
        )
    if config.data.image_size % ae.downsample_factor:
        raise UserError(
            f"config data.image_size={config.data.image_size} is not divisible by "
            f"ae.downsample_factor={ae.downsample_factor}"
        )
    for name in ("decoder", "aux_decoder"):
        dec = getattr(ae, name)
        if dec.width <= 0 or dec.num_res_blocks < 0 or not 0.0 <= dec.dropout < 1.0:
            raise UserError(f"config ae.{name}: width must be > 0, num_res_blocks >= 0, dropout in [0, 1)")
    positive = {
        "ae.latent_channels": ae.latent_channels,
        "ae.base_channels": ae.base_channels,
        "ae.vq.codebook_size": ae.vq.codebook_size,
        "train.batch_size": config.train.batch_size,
        "train.log_every": config.train.log_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.image_every": config.train.image_every,
        "scaling.num_workers": config.scaling.num_workers,
        "generator_train.batch_size": config.generator_train.batch_size,
        "generator_train.log_every": config.generator_train.log_every,
        "generator_train.image_every": config.generator_train.image_every,
        "generator_train.checkpoint_every": config.generator_train.checkpoint_every,
        "generator_train.steps": config.generator_train.steps,
        "dit.sample_steps": config.dit.sample_steps,
        "data.image_size": config.data.image_size,
        "eval.batch_size": config.eval.batch_size,
    }
    for path, value in positive.items():
        if value <= 0:
            raise UserError(f"config {path}: must be positive, got {value}")
    if config.generator != "none" and config.generator_train.batch_size % config.scaling.num_workers:
        raise UserError(
            f"config generator_train.batch_size={config.generator_train.batch_size} is not divisible by "
            f"scaling.num_workers={config.scaling.num_workers}"
        )
    if ae.bottleneck == "vq" and config.train.mode == "dae" and not config.train.freeze_quantizer:
        raise UserError("config train.freeze_quantizer=false: stage 2 with a trainable VQ codebook is not "
                        "supported; set it to true (the codebook stays with the frozen encoder)")
    if config.train.mode == "dae" and config.train.warm_start_decoder and (
        ae.aux_decoder.width != ae.decoder.width or ae.aux_decoder.num_res_blocks != ae.decoder.num_res_blocks
    ):
        raise UserError("config train.warm_start_decoder=true needs ae.aux_decoder width and num_res_blocks equal "
                        "to ae.decoder's (only dropout may differ); set it to false or match them")
    _validate_equivariance(config)
    if config.train.batch_size % config.scaling.num_workers:
        raise UserError(
            f"config train.batch_size={config.train.batch_size} is not divisible by "
            f"scaling.num_workers={config.scaling.num_workers}"
        )
    for stage in config.stages():
        if config.stage_steps(stage) <= 0:
            raise UserError(f"config: {stage} has {config.stage_steps(stage)} steps; give it at least 1")
    ev = config.eval
    for name in ("num_samples", "num_real", "num_reconstructions"):
        if getattr(ev, name) <= ev.knn_k + 1:
            raise UserError(f"config eval.{name}={getattr(ev, name)}: needs more than eval.knn_k + 1 = "
                            f"{ev.knn_k + 1} images for covariances and k-nearest-neighbour manifolds")
    if ev.latent_probe_steps < 0 or (ev.latent_probe_steps > 0 and 0 < ev.latent_quality_images < 10):
        raise UserError(f"config eval.latent_probe_steps={ev.latent_probe_steps} with eval.latent_quality_images="
                        f"{ev.latent_quality_images}: the probe generator needs steps >= 0 and, when on, at least 10 "
                        "images (0 steps turns it off)")
    gen = config.generator_train
    if gen.probe_samples != 0 and (gen.probe_samples < 16 or gen.probe_sample_steps <= 0):
        raise UserError(f"config generator_train.probe_samples={gen.probe_samples}, probe_sample_steps="
                        f"{gen.probe_sample_steps}: the sample probe needs at least 16 samples and 1 step (0 samples "
                        "turns it off)")
    dit = config.dit
    if dit.schedule == "linear" and dit.num_timesteps <= 20:  # its betas end at 0.02 * 1000 / T
        raise UserError(f"config dit.num_timesteps={dit.num_timesteps}: the linear schedule's last beta would be "
                        f"{20 / dit.num_timesteps:g} (it must stay under 1); use more than 20 timesteps (DDPM: 1000) "
                        "or dit.schedule=cosine")
    if dit.class_conditional and dit.cfg_scale != 1.0 and dit.class_dropout <= 0:
        raise UserError(f"config dit.cfg_scale={dit.cfg_scale} with dit.class_dropout={dit.class_dropout}: guidance "
                        "needs the unconditional label the DiT learns from dropped labels; set dit.class_dropout > 0 "
                        "(0.1 is usual) or dit.cfg_scale=1")
    if config.data.shuffle_buffer < 0:
        raise UserError(f"config data.shuffle_buffer: must be 0 (off) or positive, got {config.data.shuffle_buffer}")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise UserError(f"config data.val_fraction: must be in (0, 1), got {config.data.val_fraction}")


def _validate_equivariance(config: Config) -> None:
    eq = config.loss.equivariance
    if config.ae.sign_scramble and config.ae.bottleneck != "kl":
        raise UserError("config ae.sign_scramble: works with the KL bottleneck only (a sign pattern would change "
                        "what VQ codes mean); set ae.bottleneck=kl or ae.sign_scramble=false")
    if config.ae.sign_scramble and eq.weight > 0:
        raise UserError("config ae.sign_scramble with loss.equivariance.weight > 0: a fixed per-position sign "
                        "pattern cannot commute with scaling or rotation; use one of the two")
    if eq.weight < 0:
        raise UserError(f"config loss.equivariance.weight: must be >= 0 (0 turns it off), got {eq.weight}")
    if not 0.0 < eq.probability <= 1.0:
        raise UserError(f"config loss.equivariance.probability: must be in (0, 1], got {eq.probability}")
    for scale in eq.scales:
        if not 0.0 < scale <= 1.0:
            raise UserError(f"config loss.equivariance.scales: {scale} is not in (0, 1]; "
                            "give downscalings, e.g. [0.5, 0.75]")
    if eq.weight == 0:
        return  # off: the scales need not fit this image size
    if not eq.scales and not eq.rotations:
        raise UserError("config loss.equivariance: weight > 0 but no transform; give scales or set rotations=true")
    side = config.data.image_size // config.ae.downsample_factor
    for scale in eq.scales:
        # The decoder turns a latent side n into n * downsample_factor pixels, so s * side must be whole.
        if abs(scale * side - round(scale * side)) > 1e-6 or round(scale * side) < 1:
            nearest = max(round(scale * side), 1) / side
            raise UserError(
                f"config loss.equivariance.scales: {scale} gives a latent side of {scale * side:g} (latent side "
                f"{side} = data.image_size {config.data.image_size} / ae.downsample_factor "
                f"{config.ae.downsample_factor}); use multiples of 1/{side}, e.g. {nearest:g}"
            )
