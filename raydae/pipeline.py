"""Orchestration of a run: one folder, an ordered list of steps, each skipped when its done marker exists.

`run_pipeline` (`raydae run`, and each sweep trial) trains and evaluates a run; `evaluate_folder`
(`raydae eval`) scores a finished run folder again.

Layout of `<storage>/<name>/`:
    config.yaml              the resolved config (what `--config` can rerun)
    stage1/ stage2/ joint/   Ray Train runs: checkpoint_*/ (state.pt, config.yaml, metrics.json)
    stage1.done.json ...     written only after a stage finished: its metrics and final checkpoint
    tensorboard/<stage>/     TensorBoard event files (`tensorboard --logdir <run>`)
    bad_files.txt            images skipped under data.on_bad_file=skip
    metrics.json             the run's summary, written last; its `eval` key holds `raydae eval`'s results
    DONE                     marks a finished run; a run without it is continued by the same command
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import ray
import yaml

from raydae import launch
from raydae.checkpoints import check_checkpoint, load_checkpoint_state, load_generator, read_checkpoint_file
from raydae.config import Config, apply_override, validate
from raydae.data import BAD_FILES_NAME, bad_files_text, build_datasets, check_source, training_dataset
from raydae.errors import UserError
from raydae.latents import encode_dataset, latents_stored, measure_latent_space, read_latents
from raydae.probe import reference_from_features
from raydae.progress import heartbeat
from raydae.sampling import save_grid
from raydae.scoring import collect_images, evaluate_run, real_reference
from raydae.storage import RunFolder
from raydae.tasks import describe_signature, latent_signature

DONE_MARKER = "DONE"
LATENT_QUALITY_FILE = "latent_quality.json"


@dataclass
class RunOptions:
    storage: str = "runs"
    name: str = ""
    resume: bool = False
    overwrite: bool = False
    address: str | None = None
    stage1_from: str | None = None  # reuse a finished stage-1 checkpoint (folder or URI) for stage 2
    # Inside a sweep trial: stage -> Ray Train callbacks that forward the stage's reports to Ray Tune.
    stage_callbacks: Callable[[str], list] | None = None


def _stage_callbacks(options: RunOptions, stage: str) -> list | None:
    return options.stage_callbacks(stage) if options.stage_callbacks else None


def default_run_name(config: Config) -> str:
    ae = config.ae
    return f"{config.train.mode}-{ae.bottleneck}{ae.latent_channels}-s{config.train.seed}"


def prepare_run_folder(config: Config, options: RunOptions) -> tuple[RunFolder, bool]:
    """Check the run name before any work: returns (folder, already_finished)."""
    run = RunFolder(options.storage, options.name or default_run_name(config))
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if not run.exists():
        if options.resume:
            raise UserError(f"--resume: no run at {run.uri}; drop --resume to start it")
        return run, False
    if options.overwrite:
        print(f"--overwrite: deleting the earlier run at {run.uri}")
        run.delete("")
        return run, False
    finished = run.exists(DONE_MARKER)
    if finished and not options.resume:
        raise UserError(
            f"run {run.uri} is already finished; pass --resume to reuse it, --overwrite to replace it, "
            "or choose another --name"
        )
    if run.exists("config.yaml"):
        saved = Config.from_dict(yaml.safe_load(run.read_text("config.yaml")))
        # Evaluation settings do not change what was trained, so they may differ on a rerun.
        changed = [c for c in _differences(saved.to_dict(), config.to_dict()) if not c.startswith("eval.")]
        if changed:
            shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
            raise UserError(
                f"run {run.uri} was started with a different config ({shown}); continue it with the same "
                "settings, pass --overwrite to start afresh, or choose another --name"
            )
    return run, finished


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in new:
        path = f"{prefix}{key}"
        if isinstance(new[key], dict) and isinstance(old.get(key), dict):
            out += _differences(old[key], new[key], path + ".")
        elif old.get(key) != new[key]:
            out.append(f"{path}: {old.get(key)!r} -> {new[key]!r}")
    return out


def run_pipeline(config: Config, options: RunOptions) -> dict:
    """Train every stage of `config.train.mode`, skipping finished ones; returns the run's metrics."""
    run, finished = prepare_run_folder(config, options)
    if finished:
        print(f"run {run.uri} is already finished; nothing to do (metrics in {run.child('metrics.json')})")
        return run.read_json("metrics.json")
    if options.stage1_from and config.train.mode != "dae":
        raise UserError("--stage1-from needs train.mode=dae (joint training has no stage 1 to reuse)")
    stage1_state = options.stage1_from
    if stage1_state:
        _check_stage_compatibility(config, stage1_state)  # refused before any work
    if stage1_state and run.exists("stage1.done.json"):
        earlier = run.read_json("stage1.done.json")["checkpoint"]
        if earlier != stage1_state:
            raise UserError(f"run {run.uri} already used stage 1 from {earlier}; rerun with that --stage1-from "
                            "(or none), or choose another --name")

    check_source(config.data)  # a missing data path fails before Ray starts
    local_ray = launch.connect(options.address, config)
    launch.check_resources(config, local_ray)
    launch.check_storage_is_shared(options.storage)
    started = time.time()
    bundle = build_datasets(config.data)  # bad data stops here, before the run folder is touched
    check_batch_size("train.batch_size", config.train.batch_size, bundle.num_train,
                     f"the training split of data.source={config.data.source}")
    run.make()
    run.write_text("config.yaml", config.to_yaml())
    if bundle.skipped_files:
        run.write_text(BAD_FILES_NAME, bad_files_text(bundle.skipped_files))
        print(f"skipped {len(bundle.skipped_files)} unreadable image file(s), listed in "
              f"{run.child(BAD_FILES_NAME)}", flush=True)
    datasets = {"train": training_dataset(bundle), "val": bundle.val}  # a small set: several epochs a pass
    print(f"run {run.uri}: {config.train.mode} on {config.data.source} "
          f"({bundle.num_train} train / {bundle.num_val} val images)", flush=True)

    stage_results: dict[str, dict] = {}
    for stage in config.stages():
        marker = f"{stage}.done.json"
        if run.exists(marker):
            stage_results[stage] = run.read_json(marker)
            print(f"[{stage}] already finished; skipping", flush=True)
            continue
        if stage == "stage1" and stage1_state:
            stage_results[stage] = {"checkpoint": stage1_state, "metrics": _read_checkpoint_metrics(stage1_state),
                                    "source": "--stage1-from"}
            run.write_json(marker, stage_results[stage])  # a re-run without the flag keeps using it
            print(f"[stage1] taken from {stage1_state}", flush=True)
            continue
        init_from = None
        if stage == "stage2":
            init_from = stage_results["stage1"]["checkpoint"]
            if init_from != stage1_state:  # a --stage1-from checkpoint was checked at the start
                _check_stage_compatibility(config, init_from)
        t0 = time.time()
        result = launch.fit_stage(config, stage, run, datasets, init_from=init_from,
                                  callbacks=_stage_callbacks(options, stage))
        result["wall_seconds"] = time.time() - t0
        run.write_json(marker, result)
        stage_results[stage] = result

    autoencoder = stage_results[config.stages()[-1]]["checkpoint"]
    latent_measures = _measure_latents(config, run, bundle, autoencoder)
    if config.generator != "none":
        stage_results["generator"] = _run_generator(config, run, bundle, autoencoder, options)

    metrics = summarise(config, stage_results, bundle, wall_seconds=time.time() - started)
    if latent_measures:
        metrics["latent_quality"] = latent_measures
    metrics["run"] = run.uri
    if config.eval.enabled:
        print("[eval] scoring samples, reconstructions and complexity", flush=True)
        metrics["eval"] = evaluate_run(run, config, bundle)
        print(f"[eval] done in {metrics['eval']['wall_seconds']:.0f}s; {metrics['eval']['headline']}: "
              f"{metrics['eval'].get('samples', {}).get(metrics['eval']['headline'], 'n/a')}", flush=True)
        metrics["wall_seconds"] = time.time() - started
    run.write_json("metrics.json", metrics)
    run.write_text(DONE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return metrics


def _measure_latents(config: Config, run: RunFolder, bundle, autoencoder_checkpoint: str) -> dict | None:
    """The final latent space's cheap measures (latents.measure_latent_space), once per run, as a Ray task."""
    if config.eval.latent_quality_images <= 0:
        return None
    if run.exists(LATENT_QUALITY_FILE):
        return run.read_json(LATENT_QUALITY_FILE)
    images = collect_images(bundle.val, config.eval.latent_quality_images)
    scaling = config.scaling
    task = ray.remote(num_cpus=scaling.cpus_per_worker, num_gpus=scaling.gpus_per_worker if scaling.use_gpu else 0,
                      scheduling_strategy="DEFAULT")(measure_latent_space)
    pending = task.remote(autoencoder_checkpoint, images, config.eval.latent_quality_images,
                          use_gpu=scaling.use_gpu, probe_steps=config.eval.latent_probe_steps)
    measures = heartbeat("latents", "measuring the latent space", lambda: ray.get(pending))
    run.write_json(LATENT_QUALITY_FILE, measures)
    print(f"[latents] latent space: high-frequency share {measures['hf_energy']:.3f}, "
          f"decoder equivariance error {measures.get('equivariance_decoder_error', float('nan')):.4f}, probe "
          f"generator loss {measures.get('probe_generator_loss', float('nan')):.3f}", flush=True)
    return measures


def _run_generator(config: Config, run: RunFolder, bundle, autoencoder_checkpoint: str, options: RunOptions) -> dict:
    """Latents (once per encoder and data) -> the generator stage -> a grid of samples in the run folder."""
    latents = run.read_json("latents.done.json") if run.exists("latents.done.json") else None
    if latents and not run.exists("generator.done.json") and not latents_stored(latents["uri"]):
        latents = None  # deleted since: encode_dataset says so and encodes them again
    if latents is None:
        state = load_checkpoint_state(autoencoder_checkpoint)
        t0 = time.time()
        latent_set = encode_dataset(config, autoencoder_checkpoint, state, bundle, run.storage)
        verb = "reused" if latent_set.reused else f"wrote in {time.time() - t0:.0f}s"
        print(f"[latents] {verb}: {latent_set.uri}", flush=True)
        latents = {"uri": latent_set.uri, "manifest": latent_set.manifest, "reused": latent_set.reused}
        run.write_json("latents.done.json", latents)

    if run.exists("generator.done.json"):
        result = run.read_json("generator.done.json")
        print("[generator] already finished; skipping", flush=True)
    else:
        manifest = latents["manifest"]
        latent_facts = {"latent_shape": manifest["latent_shape"], "num_classes": len(manifest["label_names"])}
        if "latent_std" in manifest:
            latent_facts["latent_std"] = manifest["latent_std"]
        check_batch_size("generator_train.batch_size", config.generator_train.batch_size,
                         manifest["counts"]["train"], f"the training latents at {latents['uri']}")
        train = read_latents(latents["uri"], "train",
                             cache=latent_set_gigabytes(manifest) <= config.generator_train.cache_latents_gb)
        if config.data.shuffle_buffer > 0:
            train = train.randomize_block_order(seed=config.data.seed)
        datasets = {"train": train}  # the held-out latents are read by rank 0 alone, at the end (loop.py)
        probe = None
        if config.generator_train.probe_samples > 0:
            t0 = time.time()
            probe = reference_from_features(*real_reference(run, config, bundle))
            print(f"[generator] sample probe: {config.generator_train.probe_samples} samples at every checkpoint, "
                  f"scored in {probe['space']} features (reference ready in {time.time() - t0:.0f}s)", flush=True)
        t0 = time.time()
        result = launch.fit_stage(config, "generator", run, datasets, init_from=autoencoder_checkpoint,
                                  latent_facts=latent_facts, callbacks=_stage_callbacks(options, "generator"),
                                  probe=probe, val_latents=f"{latents['uri'].rstrip('/')}/val")
        result["wall_seconds"] = time.time() - t0
        run.write_json("generator.done.json", result)

    if not run.exists("samples.png"):
        task = load_generator(result["checkpoint"])
        images = task.sample(64, seed=0)
        local = save_grid(images, None)
        run.write_bytes("samples.png", local)
        print(f"[samples] {run.child('samples.png')}", flush=True)
    result["latents"] = latents
    return result


def check_batch_size(key: str, batch_size: int, num_train: int, split: str) -> None:
    """Refuse, before a stage starts, a global batch its training split cannot fill even once."""
    if batch_size > num_train:
        raise UserError(f"config {key}={batch_size} is larger than {split} ({num_train} rows); "
                        f"set {key} to at most {num_train} or use more data")


def latent_set_gigabytes(manifest: dict) -> float:
    """Size of the training latents in memory: KL keeps mean and log-variance (float32), VQ int64 codes."""
    channels, height, width = manifest["latent_shape"]
    per_row = (2 * 4 * channels if manifest["bottleneck"] == "kl" else 8) * height * width
    return manifest["counts"]["train"] * per_row / 1e9


def _read_checkpoint_metrics(uri: str) -> dict:
    text = read_checkpoint_file(uri, "metrics.json")
    return json.loads(text) if text else {}


def summarise(config: Config, stage_results: dict, bundle, wall_seconds: float) -> dict:
    """metrics.json: per stage, reconstruction quality on the val split, parameters, speed, time."""
    out: dict = {"mode": config.train.mode, "latent": latent_signature(config), "stages": {}}
    params: dict[str, int] = {}
    for stage, result in stage_results.items():
        if stage == "generator":
            continue  # summarised below, under its own key
        m = result["metrics"]
        counts = m.get("parameters", {})
        decoder_role = "aux_decoder" if stage == "stage1" else "decoder"
        params.setdefault("encoder", counts.get("encoder", 0) + counts.get("bottleneck", 0))
        params[decoder_role] = counts.get("decoder", 0)
        out["stages"][stage] = {
            "decoder": decoder_role,
            "steps": m.get("step"),
            "val_mse": m.get("val/mse"),
            "val_psnr": m.get("val/psnr"),
            "val_ssim": m.get("val/ssim"),
            "images_per_second": m.get("train/images_per_second"),
            "data_wait_fraction": m.get("train/data_wait_fraction"),
            "wall_seconds": result.get("wall_seconds"),
            "checkpoint": result["checkpoint"],
        }
        for key in ("val/codebook_usage", "val/perplexity"):
            if key in m:
                out["stages"][stage][key.split("/")[1]] = m[key]
    # The final decoder's held-out reconstruction under one name for both modes (DAE's stage 2, or the joint
    # stage), so studies and sweeps compare arms by the same key even without evaluation.
    final = next((out["stages"][s] for s in ("stage2", "joint") if s in out["stages"]), None)
    if final is not None:
        out["final_decoder"] = {key: final[key] for key in ("val_mse", "val_psnr", "val_ssim", "steps")}
    generator = stage_results.get("generator")
    if generator:
        m = generator["metrics"]
        counts = m.get("parameters", {})
        trained = "dit" if config.generator == "dit" else "prior"
        params["generator"] = counts.get(trained, 0)
        out["generator"] = {
            "kind": config.generator,
            "model": config.dit.model if config.generator == "dit" else config.prior.model,
            "steps": m.get("step"),
            **{key.split("/", 1)[1]: value for key, value in m.items()
               if key.startswith("val/") and key != "val/latents"},
            **{key.replace("/", "_"): value for key, value in m.items() if key.startswith("probe/")},
            "latents_per_second": m.get("train/images_per_second"),
            "data_wait_fraction": m.get("train/data_wait_fraction"),
            "wall_seconds": generator.get("wall_seconds"),
            "checkpoint": generator["checkpoint"],
            "latents": generator["latents"]["uri"],
            "latents_reused": generator["latents"].get("reused", False),
            "samples": "samples.png",
        }
        if "latent_std" in generator["latents"]["manifest"]:
            out["generator"]["latent_std"] = generator["latents"]["manifest"]["latent_std"]
    out["parameters"] = params
    out["data"] = {"train_images": bundle.num_train, "val_images": bundle.num_val,
                   "skipped_files": len(bundle.skipped_files)}
    out["wall_seconds"] = wall_seconds
    return out


def _read_checkpoint_config(uri: str) -> Config:
    missing = f"{uri}: not a raydae checkpoint folder (no readable config.yaml)"
    try:
        text = read_checkpoint_file(uri, "config.yaml")
    except OSError as err:
        raise UserError(f"{missing}: {err}") from None
    if text is None:
        raise UserError(missing)
    return Config.from_dict(yaml.safe_load(text))


def _check_stage_compatibility(config: Config, stage1_uri: str) -> None:
    """Stage 2 refuses a stage-1 checkpoint whose bottleneck or latent shape differs, naming both."""
    stage1_config = _read_checkpoint_config(stage1_uri)
    have, want = latent_signature(stage1_config), latent_signature(config)
    if have != want:
        raise UserError(
            f"stage-1 checkpoint {stage1_uri} has a {describe_signature(have)} but stage 2 expects a "
            f"{describe_signature(want)}; use a matching checkpoint or the same ae.* settings"
        )
    # The frozen encoder's weights must also fit the encoder this config builds.
    fields = ("base_channels", "channel_mults", "num_res_blocks")
    differing = [f"ae.{f}: {getattr(stage1_config.ae, f)!r} vs {getattr(config.ae, f)!r}"
                 for f in fields if getattr(stage1_config.ae, f) != getattr(config.ae, f)]
    if differing:
        raise UserError(f"stage-1 checkpoint {stage1_uri} has another encoder ({', '.join(differing)}); "
                        "use the checkpoint's ae.* encoder settings")


def evaluate_folder(run_dir: str, overrides: list[str], address: str | None) -> dict:
    """`raydae eval RUN_DIR`: evaluate a finished run again and update its metrics.json."""
    run = RunFolder.from_path(run_dir)
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
    _check_run_checkpoints(run, run_dir, config)  # before any work, so nothing in the folder is rewritten
    check_source(config.data)
    launch.connect(address, config)
    bundle = build_datasets(config.data)
    metrics = run.read_json("metrics.json") if run.exists("metrics.json") else {}
    metrics["eval"] = evaluate_run(run, config, bundle)
    run.write_json("metrics.json", metrics)
    return metrics


def _check_run_checkpoints(run: RunFolder, run_dir: str, config: Config) -> None:
    """Every checkpoint `raydae eval` reads (each stage's, the generator's when it trained) is there and loads."""
    markers = [f"{s}.done.json" for s in config.stages()]
    if run.exists("generator.done.json"):
        markers.append("generator.done.json")
    hint = "restore it, or train the run again under a new --name (nothing was evaluated or written)"
    for marker in markers:
        step = marker.removesuffix(".done.json")
        try:
            uri = run.read_json(marker)["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{run_dir}: {marker} cannot be read ({type(err).__name__}); {hint}") from None
        check_checkpoint(uri, f"{step} checkpoint", hint)
