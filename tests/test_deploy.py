"""deploy/: every file parses and carries what its tool needs."""

import json
import os
import re

import yaml

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "deploy")


def _yaml(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.safe_load(f)


def test_rayjob_manifest():
    job = _yaml("rayjob-70b.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("raymerge merge") and "s3://" in spec["entrypoint"]
    for flag in ("--base", "--chat", "--cp", "--out"):
        assert flag in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["replicas"] >= 1 and w["template"]["spec"]["containers"][0]["image"] for w in workers)
    # resources advertised by the workers parse as JSON, as `ray start --resources` needs
    json.loads(yaml.safe_load(workers[0]["rayStartParams"]["resources"]))
    assert "AWS_SECRET_ACCESS_KEY:" not in open(os.path.join(DEPLOY, "rayjob-70b.yaml")).read().replace("# ", "")


def test_cluster_launcher_config():
    cfg = _yaml("cluster-aws.yaml")
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for node in cfg["available_node_types"].values():
        assert node["node_config"]["InstanceType"] and "resources" in node
    assert any("raymerge" in c for c in cfg["setup_commands"])


def test_runtime_env_and_dockerfile():
    env = _yaml("runtime_env.yaml")
    assert "raymerge" in env["pip"]
    docker = open(os.path.join(DEPLOY, "Dockerfile")).read()
    assert re.search(r"^FROM rayproject/ray:", docker, re.M)
    assert re.search(r"pip install .*\.$", docker, re.M)  # installs this checkout


def test_deploy_readme_covers_every_file():
    readme = open(os.path.join(DEPLOY, "README.md")).read()
    for name in os.listdir(DEPLOY):
        if name != "README.md":
            assert name in readme, name
