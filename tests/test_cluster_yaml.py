"""cluster.yaml against Ray's own cluster-launcher schema, and the safety choices the README promises."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_rays_schema():
    import jsonschema

    jsonschema.validate(yaml.safe_load((ROOT / "cluster.yaml").read_text()), _schema())


def test_the_commented_on_premises_alternative_is_valid_too():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    block = re.search(r"#   provider:\n(?:#.*\n)+?#     worker_ips: .*\n#   auth:\n(?:#     .*\n)+", (ROOT / "cluster.yaml").read_text())
    assert block, "cluster.yaml lost its provider: local example"
    local = yaml.safe_load("\n".join(line[4:] for line in block.group(0).splitlines()))
    config.update(local)
    config["available_node_types"] = {"head": {"resources": {}, "node_config": {}},
                                      "worker": {"resources": {}, "node_config": {}, "min_workers": 0}}
    config["head_node_type"] = "head"
    jsonschema.validate(config, _schema())


def test_dashboard_stays_on_loopback_and_no_credentials_are_in_the_file():
    text = (ROOT / "cluster.yaml").read_text()
    starts = " ".join(yaml.safe_load(text)["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|ssh_private_key: (?!~)", text)
