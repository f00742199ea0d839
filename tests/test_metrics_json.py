"""One rule for a metric value (a finite number) and one reader of dotted paths, for sweeps, studies and reports."""

from __future__ import annotations

import math

from raydae.metrics_json import dotted_get, flatten_numbers, metric_value
from raydae.report import decoder_label
from raydae.storage import RunFolder

METRICS = {"eval": {"samples": {"fd_randfeat": 3.5, "num": 100, "nan": math.nan}},
           "generator": {"diffusion_loss": 0.9, "probe_inf": math.inf}, "flag": True, "kind": "dit"}


def test_a_metric_value_is_a_finite_number_found_by_name_or_dotted_path():
    assert metric_value(METRICS, "fd_randfeat") == 3.5  # a bare name is looked up in eval.samples
    assert metric_value(METRICS, "eval.samples.num") == 100.0
    assert metric_value(METRICS, "generator.diffusion_loss") == 0.9
    for missing in ("fid", "generator.nope", "nan", "generator.probe_inf", "flag.x", "kind"):
        assert metric_value(METRICS, missing) is None, missing
    assert metric_value({"flag": True}, "x.flag") is None and metric_value(None, "fd_randfeat") is None


def test_dotted_get_returns_any_node_or_the_default():
    assert dotted_get(METRICS, "generator.kind", "—") == "—"
    assert dotted_get(METRICS, "kind") == "dit" and dotted_get(METRICS, "eval.samples")["num"] == 100


def test_flatten_keeps_finite_numbers_under_joined_paths():
    assert flatten_numbers(METRICS) == {"eval.samples.fd_randfeat": 3.5, "eval.samples.num": 100,
                                        "generator.diffusion_loss": 0.9}
    assert flatten_numbers({"a": {"b": 1.0}}, "eval/", sep="/") == {"eval/a/b": 1.0}


def test_decoder_label_reads_a_config_section():
    assert decoder_label({"width": 0.5, "num_res_blocks": 1, "dropout": 0.0}) == "w0.5 b1 d0"
    assert decoder_label({}) == "w1 b2 d0" and decoder_label(None) == "?"


def test_run_folder_from_a_command_line_path(tmp_path):
    run = RunFolder.from_path(f"{tmp_path}/runs/dae-kl4-s0/")
    assert (run.storage, run.name) == (str(tmp_path / "runs"), "dae-kl4-s0")
    assert RunFolder.from_path("dae-kl4-s0").uri == RunFolder(".", "dae-kl4-s0").uri  # a bare name: here
