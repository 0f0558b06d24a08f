"""`cluster.yaml` and `k8s/rayjob.yaml` are valid and keep the cluster closed.

The launcher config goes through Ray's own checks (`prepare_config` merges the AWS
defaults the way `ray up` does, then `validate_config` applies Ray's JSON schema and
its cross-field rules), so a typo fails here rather than half-way through a `ray up`.
The security rules are asserted on the *merged* config, so a default of Ray's (whose
AWS defaults bind the dashboard to 0.0.0.0) cannot creep back in.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "k8s" / "rayjob.yaml"
PVC_YAML = ROOT / "k8s" / "results-pvc.yaml"

COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` sees it before talking to AWS, validated by Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def all_commands(config: dict[str, Any]) -> list[str]:
    out = [c for key in COMMAND_KEYS for c in config.get(key) or []]
    for node_type in config["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += node_type.get(key) or []
    return out


def ray_start_commands(config: dict[str, Any]) -> list[str]:
    cmds = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


# --------------------------------------------------------------------------- cluster.yaml


def test_ray_validates_cluster_yaml(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validator_is_live(raw: dict[str, Any]) -> None:
    """The validator rejects a broken copy, so the test above cannot pass vacuously."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["ray.worker.gpu1"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    unknown = copy.deepcopy(raw)
    unknown["dashbaord_host"] = "127.0.0.1"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(unknown))


def test_no_ingress_but_ssh(prepared: dict[str, Any]) -> None:
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
        assert rule.get("IpProtocol") == "tcp", rule
    # Every node uses the launcher's group (SSH + intra-cluster only); a group of one's
    # own (SecurityGroupIds) would bypass these rules, so it is a reviewed change.
    for name, node_type in prepared["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], name


def test_dashboard_is_local_only(prepared: dict[str, Any]) -> None:
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for cmd in all_commands(prepared):
        assert "0.0.0.0" not in cmd, cmd
        assert "--ray-client-server-port" not in cmd, cmd


def test_token_auth_on_every_node(prepared: dict[str, Any]) -> None:
    starts = ray_start_commands(prepared)
    assert len(starts) == 2  # head and workers
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    commands = all_commands(prepared)
    assert not any("RAY_AUTH_MODE=disabled" in c for c in commands)
    assert not any("RAY_AUTH_TOKEN=" in c for c in commands), "no token in the config"
    # the locally generated token reaches every node (workers get the head's file mounts)
    token_mounts = {r: loc for r, loc in prepared["file_mounts"].items() if
                    r.endswith(".ray/auth_token")}
    assert token_mounts == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_gpu_node_types(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "the head never hosts a model"
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert 1 in gpus.values(), "a one-GPU worker type (8B models in 16-bit)"
    assert any(g >= 2 for g in gpus.values()), "a multi-GPU type (gpus_per_replica >= 2)"
    spot = [t for t in types.values()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(t["resources"].get("GPU", 0) >= 1 for t in spot)
    assert sum(t.get("min_workers", 0) for t in types.values()) >= 1, (
        "the driver sizes a sweep on the GPUs present at its start"
    )


def test_setup_installs_cuda_torch_then_the_project(prepared: dict[str, Any]) -> None:
    setup = prepared["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "download.pytorch.org/whl/cu" in c)
    project_at = next(i for i, c in enumerate(setup) if "pip install" in c and " -e " in c)
    assert torch_at < project_at
    import ray

    assert any(f"ray[default]=={ray.__version__}" in c for c in setup), (
        "cluster Ray must equal the Ray that runs `ray up` / `ray job submit`"
    )
    assert "~/rloop-ray" in prepared["file_mounts"]


def test_commands_are_valid_bash(prepared: dict[str, Any]) -> None:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for cmd in all_commands(prepared):
        done = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}: {done.stderr}"


def test_docker_alternative_is_documented() -> None:
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert "# docker:" in text and "#   image: rayproject/ray:" in text


# --------------------------------------------------------------------------- k8s/rayjob.yaml


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(RAYJOB_YAML)


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def test_rayjob_kind_and_entrypoint(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["rloop-ray", "sweep"]
    assert argv[2].endswith(".yaml") and "sweeps/" in argv[2]
    assert argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--results-dir") + 1].startswith("/results")
    assert not {"&&", ";", "|"} & set(argv), "the submitter would run the rest itself"


def test_rayjob_token_auth(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"


def test_rayjob_gpu_workers(rayjob: dict[str, Any]) -> None:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        (worker,) = [c for c in containers(group["template"]) if c["name"] == "ray-worker"]
        limits = worker["resources"]["limits"]
        requests = worker["resources"].get("requests", {})
        assert int(limits["nvidia.com/gpu"]) >= 1
        # Kubernetes requires requests == limits for extended resources when both are set
        assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == int(
            limits["nvidia.com/gpu"]
        )
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    head_limits = containers(head["template"])[0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    assert str(head["rayStartParams"].get("num-cpus")) == "0", "no model on the head"


def _mounts_results(template: dict[str, Any]) -> str:
    """The claim name of the volume mounted at /results in this pod template."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for c in containers(template):
        for m in c.get("volumeMounts", []):
            if m["mountPath"] == "/results":
                return volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
    raise AssertionError("no volume mounted at /results")


def test_rayjob_results_volume(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    claims = {_mounts_results(cluster["headGroupSpec"]["template"])}
    claims |= {_mounts_results(g["template"]) for g in cluster["workerGroupSpecs"]}
    assert len(claims) == 1
    pvc = load_yaml(PVC_YAML)
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["name"] in claims
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and workers mount it"


def test_k8s_readme_documents_object_store() -> None:
    text = (ROOT / "k8s" / "README.md").read_text(encoding="utf-8")
    assert "s3://" in text
