"""raydae.report on a hand-made sweep folder: two DAE runs, one joint run, one unfinished run. No Ray."""

import json

import pytest
import yaml
from PIL import Image

from raydae.errors import UserError
from raydae.report import write_report


def make_run(folder, mode="dae", latent=(4, 8, 8), aux_width=0.5, seed=0, fd=30.0, flops=2e7, stages=None,
             finished=True):
    """A run folder as raydae leaves it: config.yaml, metrics.json, samples.png, tensorboard/<stage>/."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True)
    config = {"train": {"mode": mode, "seed": seed}, "generator": "dit", "data": {"image_size": 32},
              "ae": {"latent_channels": latent[0], "bottleneck": "kl",
                     "aux_decoder": {"width": aux_width, "num_res_blocks": 1, "dropout": 0.0},
                     "decoder": {"width": 1.0, "num_res_blocks": 2, "dropout": 0.0}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    stages = stages or (["stage1", "stage2", "generator"] if mode == "dae" else ["joint", "generator"])
    for stage in stages:
        writer = SummaryWriter(str(folder / "tensorboard" / stage))
        key = "loss/diffusion" if stage == "generator" else "loss/total"
        for step in (2, 4, 6):
            writer.add_scalar(f"{stage}/{key}", 1.0 / step, step)
        writer.add_scalar(f"{stage}/val/{'diffusion_loss' if stage == 'generator' else 'mse'}", 0.1, 6)
        writer.close()
    if not finished:
        return
    Image.new("RGB", (24, 24), (40 * seed % 255, 120, 200)).save(folder / "samples.png")
    metrics = {
        "mode": mode, "latent": {"bottleneck": "kl", "latent_shape": list(latent)},
        "stages": {"stage2" if mode == "dae" else "joint": {"decoder": "decoder", "val_mse": 0.01, "val_psnr": 20.0}},
        "generator": {"kind": "dit", "samples": "samples.png"},
        "parameters": {"encoder": 1000, "decoder": 3000, "generator": 1_274_000,
                       **({"aux_decoder": 800} if mode == "dae" else {})},
        "eval": {
            "headline": "fd_shapesclf",
            "features": {"randfeat": "RandomFeatureNet(seed=0, dim=256)", "shapesclf": "shapes classifier"},
            "samples": {"num": 100, "fd_shapesclf": fd, "fd_randfeat": fd / 3, "precision_shapesclf": 0.6,
                        "class_fractions": {"circle": 0.5}},
            "reconstruction": {"decoder": {"mse": 0.01, "psnr": 19.7}},
            "real_vs_real": {"fd_shapesclf": 0.15},
            "complexity": {"decoder": {"parameters": 3000, "flops_per_image": flops}},
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_run(root / "trials" / "dae_small", latent=(4, 8, 8), aux_width=0.5, seed=0, fd=20.0, flops=2e7)
    make_run(root / "trials" / "dae_big", latent=(8, 8, 8), aux_width=1.0, seed=1, fd=40.0, flops=4e7)
    make_run(root / "joint", mode="joint", latent=(4, 8, 8), seed=0, fd=30.0, flops=2e7)
    make_run(root / "running", finished=False, stages=["stage1"])
    # Started, no tensorboard yet: its checkpoint (config.yaml + metrics.json) must not pass for a run.
    checkpoint = root / "starting" / "stage1" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (root / "starting" / "config.yaml").write_text("train: {mode: dae}\n")
    for name in ("config.yaml", "metrics.json"):
        (checkpoint / name).write_text("{}")
    return root


def table_rows(text, header_start):
    """Data rows of the markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_sweep_report(sweep):
    result = write_report(str(sweep))
    assert result["metric"] == "fd_shapesclf" and result["mode"] == "min" and result["runs"] == 4

    text = (sweep / "report.md").read_text()
    rows = table_rows(text, "| run | mode |")
    assert [row[0] for row in rows] == ["trials/dae_small", "joint", "trials/dae_big"]  # best (lowest) first
    assert rows[0][1:5] == ["DAE", "kl 4x8x8", "w0.5 b1 d0", "w1 b2 d0"]
    assert rows[1][3] == "—"  # a joint run has no auxiliary decoder
    assert "shapes classifier" in text and "FID" not in text  # names the feature net, never calls it FID
    assert "`running`" in text  # the unfinished run is listed, not ranked

    figures = result["figures"]
    assert set(figures) == {"loss_curves", "quality_vs_complexity", "metric_vs_latent_size", "samples_side_by_side"}
    for name, figure in figures.items():
        assert f"![{name}](report/{name}.png)" in text
        with Image.open(figure["path"]) as image:
            assert image.width > 0 and image.height > 0
    assert figures["loss_curves"]["panels"] == ["stage1", "stage2", "joint", "generator"]
    titles = figures["samples_side_by_side"]["panels"]
    assert titles[:2] == ["DAE: trials/dae_small", "joint: joint"] and len(titles) == 3
    assert figures["metric_vs_latent_size"]["lines"] == ["aux w0.5 b1 d0", "aux w1 b1 d0", "joint"]
    assert list((sweep / "tensorboard" / "report").glob("events.out.tfevents.*"))


def test_metric_and_mode_override(sweep):
    result = write_report(str(sweep), metric="precision_shapesclf", tensorboard=False)
    assert result["mode"] == "max"
    result = write_report(str(sweep), metric="fd_randfeat", mode="max", tensorboard=False)
    rows = table_rows((sweep / "report.md").read_text(), "| run | mode |")
    assert rows[0][0] == "trials/dae_big"  # highest first under mode=max


def test_seeds_share_a_point(tmp_path):
    make_run(tmp_path / "s0", seed=0, fd=10.0)
    make_run(tmp_path / "s1", seed=1, fd=14.0)
    result = write_report(str(tmp_path), tensorboard=False)
    assert result["figures"]["metric_vs_latent_size"]["lines"] == ["aux w0.5 b1 d0"]


def test_single_run(tmp_path):
    run = tmp_path / "dae-kl4-s0"
    make_run(run, fd=12.0)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["latent"] = {"bottleneck": "vq", "shape": [16, 4, 4], "codebook_size": 256}  # the other spelling
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = write_report(str(run), tensorboard=False)
    text = (run / "report.md").read_text()
    assert "## Config" in text and "eval.samples.fd_shapesclf" in text and "vq 16x4x4 (256 codes)" in text
    assert result["figures"]["loss_curves"]["panels"] == ["stage1", "stage2", "generator"]
    assert result["figures"]["samples_side_by_side"]["panels"] == ["dae-kl4-s0"]
    assert (run / "report" / "loss_curves.png").is_file()


def test_run_without_eval(tmp_path):
    make_run(tmp_path / "r", fd=1.0)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    del metrics["eval"]
    (tmp_path / "r" / "metrics.json").write_text(json.dumps(metrics))
    result = write_report(str(tmp_path), tensorboard=False)
    assert result["metric"] is None
    assert set(result["figures"]) == {"loss_curves", "samples_side_by_side"}


def test_a_dotted_metric_path_ranks_like_its_sample_key(sweep):
    """Sweep and study files name metrics by path (eval.samples.fd_shapesclf); the report takes those too."""
    orders, texts = [], []
    for metric in ("fd_shapesclf", "eval.samples.fd_shapesclf"):
        result = write_report(str(sweep), metric=metric, tensorboard=False)
        assert result["mode"] == "min"
        texts.append((sweep / "report.md").read_text())
        orders.append([row[0] for row in table_rows(texts[-1], "| run")])
    assert orders[0] == orders[1] and orders[0][:3] == ["trials/dae_small", "joint", "trials/dae_big"]
    for text in texts:  # described alike: the feature space and the real-vs-real floor; not listed twice
        assert "in the feature space of `shapesclf`" in text and "Real-vs-real floor: 0.15." in text
        assert table_rows(text, "| run | fd_randfeat |") and "| run | fd_randfeat | fd_shapesclf |" not in text
    with pytest.raises(UserError, match="no run's metrics.json has a number at that path"):
        write_report(str(sweep), metric="eval.samples.nope", tensorboard=False)


def test_reconstruction_quality_paths_rank_higher_first(sweep):
    """PSNR and SSIM are better higher, like precision and recall; the direction is guessed from the name."""
    for metric in ("eval.reconstruction.decoder.psnr", "stages.joint.val_psnr"):
        assert write_report(str(sweep), metric=metric, tensorboard=False)["mode"] == "max"
    text = (sweep / "report.md").read_text()
    assert "Metric: **`stages.joint.val_psnr`** (higher is better)." in text


def test_unknown_metric_lists_available(sweep):
    with pytest.raises(UserError, match=r"'fid' is in no run.*available: .*fd_shapesclf"):
        write_report(str(sweep), metric="fid", tensorboard=False)


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty" / "tensorboard").mkdir(parents=True)
    with pytest.raises(UserError, match="no runs found"):
        write_report(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such folder"):
        write_report(str(tmp_path / "missing"))


def add_metrics(folder, **sections):
    """Merge sections into a fake run's metrics.json (e.g. latent_quality={...})."""
    metrics = json.loads((folder / "metrics.json").read_text())
    for key, value in sections.items():
        if key == "latent_distance":
            metrics["eval"]["latent_distance"] = value
        else:
            metrics[key] = value
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_latent_measures_are_rank_correlated_with_the_sample_distance(tmp_path, capsys):
    # Five runs, fd 10..50. hf_energy rises with fd (ρ = 1), channel_std_min falls (ρ = −1),
    # kurtosis_max_abs exists in three runs only, the latent-data distance in four (with a tie).
    hf = [0.1, 0.2, 0.3, 0.4, 0.5]
    std_min = [5.0, 4.0, 3.0, 2.0, 1.0]
    distance = [1.0, 1.0, 2.0, 3.0, None]
    for i, fd in enumerate([10.0, 20.0, 30.0, 40.0, 50.0]):
        folder = tmp_path / f"r{i}"
        make_run(folder, seed=i, fd=fd, stages=["stage1"])
        quality = {"hf_energy": hf[i], "channel_std_min": std_min[i], "kurtosis_mean": float("nan")}
        if i < 3:
            quality["kurtosis_max_abs"] = 1.0 + i
        add_metrics(folder, latent_quality=quality, wall_seconds=100.0,
                    generator={"kind": "dit", "samples": "samples.png", "wall_seconds": 30.0},
                    **({"latent_distance": {"value": distance[i], "paired_l2_val": 7.0 - i, "seed": 0}}
                       if distance[i] is not None else {}))
    make_run(tmp_path / "no_latent_measures", seed=9, fd=25.0, stages=["stage1"])  # left out of every row

    result = write_report(str(tmp_path), tensorboard=False)
    rows = {row["measure"]: row for row in result["latent_correlations"]}
    # NaN kurtosis_mean is no number: no run has it, so it gets no row at all.
    assert list(rows) == ["latent_quality.channel_std_min", "latent_quality.hf_energy",
                          "latent_quality.kurtosis_max_abs", "eval.latent_distance.value",
                          "eval.latent_distance.paired_l2_val"]
    assert rows["latent_quality.hf_energy"] == {"measure": "latent_quality.hf_energy", "rho": pytest.approx(1.0),
                                                "low": 1.0, "high": 1.0, "n": 5}
    assert rows["latent_quality.channel_std_min"]["rho"] == pytest.approx(-1.0)
    assert rows["latent_quality.kurtosis_max_abs"]["rho"] is None and rows["latent_quality.kurtosis_max_abs"]["n"] == 3
    tie = rows["eval.latent_distance.value"]  # ranks 1.5, 1.5, 3, 4 against 1, 2, 3, 4
    assert tie["n"] == 4 and tie["rho"] == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert tie["low"] <= tie["rho"] <= tie["high"]

    text = (tmp_path / "report.md").read_text()
    assert "## Latent measures vs `fd_shapesclf`" in text
    table = {row[0]: row[1:] for row in table_rows(text, "| measure | runs |")}
    assert table["`latent_quality.hf_energy`"] == ["5", "1", "[1, 1]"]
    assert table["`latent_quality.channel_std_min`"] == ["5", "-1", "[-1, -1]"]
    assert table["`latent_quality.kurtosis_max_abs`"] == ["3", "fewer than 4 runs", "—"]
    assert table["`eval.latent_distance.paired_l2_val`"][:2] == ["4", "-1"]
    assert "## Latent measures vs `fd_shapesclf`" in capsys.readouterr().out  # printed as well
    # |rho| = 1: stopping the worse half by the measure keeps the 3 best runs; the 2 stopped ones would have
    # spent 30 s each on the generator (no evaluation seconds recorded here), of 5 x 100 s.
    for measure in ("hf_energy", "channel_std_min"):
        line = next(line for line in text.splitlines() if line.startswith(f"- `latent_quality.{measure}`"))
        assert "keeps 3 of 5; 3 of the final top half" in line and "final best survives" in line
        assert "saves 60 s" in line and "12% of the sweep's 500 s" in line
    assert "- `latent_quality.kurtosis_max_abs`" not in text  # no rho, no replay


def test_no_latent_table_without_latent_measures_or_for_one_run(sweep, tmp_path):
    result = write_report(str(sweep), tensorboard=False)
    assert result["latent_correlations"] == [] and "Latent measures" not in (sweep / "report.md").read_text()
    make_run(tmp_path / "one", fd=12.0, stages=["stage1"])
    add_metrics(tmp_path / "one", latent_quality={"hf_energy": 0.3})
    result = write_report(str(tmp_path / "one"), tensorboard=False)
    assert result["latent_correlations"] == [] and "Latent measures" not in (tmp_path / "one" / "report.md").read_text()


def test_fifo_sweep_report_replays_asha_on_the_probes(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path / "fifo"
    # Probe distances at steps 100 and 200, arriving run by run. At the rung (factor 2) b is worse than a, the
    # only one recorded before it, and d worse than the median of a, b, c: both would stop; a and c run on.
    probes = {"a": (30.0, 25.0), "b": (50.0, 45.0), "c": (20.0, 15.0), "d": (60.0, 55.0)}
    for index, (name, (first, last)) in enumerate(probes.items()):
        make_run(root / name, fd=last + 1.0)
        writer = SummaryWriter(str(root / name / "tensorboard" / "generator"))
        writer.add_scalar("generator/probe/fd", first, 100, walltime=1000.0 + index)
        writer.add_scalar("generator/probe/fd", last, 200, walltime=2000.0 + index)
        writer.close()
    write_report(str(root), tensorboard=False)
    text = (root / "report.md").read_text()
    assert "## ASHA replayed on these runs" in text
    rows = {row[0].strip("`"): row for row in table_rows(text, "| run | probe at step 100")}
    assert [rows[name][2] for name in "abcd"] == ["runs on", "100", "runs on", "100"]
    assert rows["c"][4] == "1" and rows["d"][4] == "4"
    assert "would stop 2 of 4 runs; 2 of those rank in the worse half" in text and "best run would survive" in text
    # Runs stopped early (an ASHA sweep) have nothing to replay.
    make_run(root / "e", fd=10.0, stages=["stage1"])
    writer = SummaryWriter(str(root / "e" / "tensorboard" / "generator"))
    writer.add_scalar("generator/probe/fd", 70.0, 100, walltime=1005.0)
    writer.add_scalar("generator/probe/fd", 69.0, 150, walltime=1006.0)
    writer.close()
    write_report(str(root), tensorboard=False)
    assert "ASHA replayed" not in (root / "report.md").read_text()


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """`fake://bucket/...` URIs served by pyarrow's SubTreeFileSystem over a local folder: a filesystem that only
    the storage layer can reach (a local-path reading of the URI finds nothing)."""
    import pyarrow.fs as pafs

    from raydae import storage

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    real = storage.filesystem

    def filesystem(uri):
        if uri.startswith("fake://"):
            return pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), uri.removeprefix("fake://").strip("/")
        return real(uri)

    monkeypatch.setattr(storage, "filesystem", filesystem)
    return bucket


def test_report_on_a_storage_uri_reads_and_writes_through_the_storage_layer(sweep, tmp_path, fake_bucket):
    import shutil

    shutil.copytree(sweep, fake_bucket / "sweeps" / "sweep")
    stale = fake_bucket / "sweeps" / "sweep" / "tensorboard" / "report"
    stale.mkdir(parents=True)
    (stale / "events.out.tfevents.old").write_text("stale")
    result = write_report("fake://sweeps/sweep")
    assert result["metric"] == "fd_shapesclf" and result["runs"] == 4
    assert result["report"] == "fake://sweeps/sweep/report.md"
    written = fake_bucket / "sweeps" / "sweep"
    text = (written / "report.md").read_text()
    assert "under `fake://sweeps/sweep`" in text and "raydae report: sweep" in text
    rows = table_rows(text, "| run | mode |")
    assert [row[0] for row in rows] == ["trials/dae_small", "joint", "trials/dae_big"]
    for name, figure in result["figures"].items():
        assert figure["path"] == f"fake://sweeps/sweep/report/{name}.png"
        with Image.open(written / "report" / f"{name}.png") as image:
            assert image.width > 0
    events = [p.name for p in (written / "tensorboard" / "report").iterdir()]
    assert len(events) == 1 and events[0] != "events.out.tfevents.old"  # the stale figure file is gone
    with pytest.raises(UserError, match="^fake://sweeps/missing: cannot read it"):
        write_report("fake://sweeps/missing")


def test_report_on_a_file_uri(sweep):
    result = write_report(f"file://{sweep}", tensorboard=False)
    assert result["report"] == f"file://{sweep}/report.md" and (sweep / "report.md").is_file()
    assert [row[0] for row in table_rows((sweep / "report.md").read_text(), "| run | mode |")][0] == "trials/dae_small"
