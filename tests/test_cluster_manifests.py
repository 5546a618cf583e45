"""cluster/: the KubeRay manifests against the KubeRay CRD schemas, the launcher YAML against Ray's
own launcher schema, and every file, preset and import path they name. Unit tier: no Ray cluster,
no Kubernetes.

The CRDs come from ../shared/kuberay-crds/ beside the repository (CI clones shared/ there). A
Kubernetes API server validates a custom resource against the CRD's openAPIV3Schema and, with
kubectl's default strict field validation, rejects unknown fields; the KubeRay operator then rejects
a few more things (validation.go). Both are reproduced here, so a manifest a real cluster would
reject fails, and the negative tests prove that the checks can fail.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
KUBERAY = REPO / "cluster" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # KubeRay's utils/constant.go


def _strict(schema):
    """kubectl's strict field validation: objects with declared properties take no others."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators():
    assert CRD_DIR.is_dir(), f"the KubeRay CRDs are expected in {CRD_DIR} (shared/ beside the repository)"
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))
    return out


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")] if spec.get("rayClusterSpec") else [],
            "RayService": [spec.get("rayClusterConfig")]}[doc["kind"]]


def _pod_specs(cluster: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    return pods + [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def problems(doc: dict, validators) -> list[str]:
    """Why the API server or the KubeRay operator would reject this resource (empty: accepted)."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in validators:
        return [f"not a ray.io/v1 RayCluster, RayJob or RayService: {doc.get('apiVersion')} {kind}"]
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validators[kind].iter_errors(doc)]
    if errors:
        return errors
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS1035.fullmatch(name) or len(name) > MAX_NAME[kind]:
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    if kind == "RayJob" and not (doc["spec"].get("rayClusterSpec") or doc["spec"].get("clusterSelector")):
        errors.append("RayJob: one of rayClusterSpec or clusterSelector must be set")
    for cluster in _cluster_specs(doc):
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") == "token" and _version(cluster.get("rayVersion", "0")) < (2, 52, 0):
            errors.append("authOptions.mode token needs rayVersion 2.52.0 or later")
        autoscaling = cluster.get("enableInTreeAutoscaling", False)
        for group, pod in _pod_specs(cluster):
            if not pod.get("containers"):
                errors.append(f"{group}: the pod template needs at least one container")
        for g in cluster.get("workerGroupSpecs", []):
            lo, hi = g.get("minReplicas"), g.get("maxReplicas")
            if not autoscaling and (lo is None or hi is None):
                errors.append(f"worker group {g['groupName']}: minReplicas and maxReplicas are needed without autoscaling")
            if lo is not None and hi is not None and not 0 <= lo <= hi:
                errors.append(f"worker group {g['groupName']}: needs 0 <= minReplicas <= maxReplicas")
            if "labels" in g.get("rayStartParams", {}):
                errors.append(f"worker group {g['groupName']}: rayStartParams.labels is not supported")
    return errors


# --- the manifests are valid ------------------------------------------------------------------


def test_every_manifest_is_accepted(validators):
    docs = _manifests()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"], kinds
    for name, doc in docs:
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["apiVersion"] == "v1" and "ReadWriteMany" in doc["spec"]["accessModes"], name
            continue
        assert problems(doc, validators) == [], name


@pytest.mark.parametrize("breakage", [
    "unknown field", "wrong type", "missing required field", "token auth without rayVersion", "bad name",
    "min above max replicas",
])
def test_a_broken_manifest_is_rejected(validators, breakage):
    docs = {d["kind"]: d for _, d in _manifests()}
    for kind in ("RayCluster", "RayJob", "RayService"):
        doc = copy.deepcopy(docs[kind])
        cluster = _cluster_specs(doc)[0]
        group = cluster["workerGroupSpecs"][0]
        if breakage == "unknown field":
            cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")  # a typo kubectl --validate=strict refuses
        elif breakage == "wrong type":
            group["replicas"] = "two"
        elif breakage == "missing required field":
            del group["groupName"]
        elif breakage == "token auth without rayVersion":
            del cluster["rayVersion"]
        elif breakage == "bad name":
            doc["metadata"]["name"] = "Rayfine_Pipeline"
        elif breakage == "min above max replicas":
            group["minReplicas"], group["maxReplicas"] = 3, 1
        assert problems(doc, validators), f"{kind} with {breakage} was accepted"


# --- what the manifests name exists and fits together ------------------------------------------


def _containers(doc: dict) -> list[tuple[str, dict, dict]]:
    return [(group, c, pod) for cluster in _cluster_specs(doc) for group, pod in _pod_specs(cluster) for c in pod["containers"]]


def test_every_ray_cluster_has_token_auth_a_private_dashboard_a_gpu_group_and_shared_storage():
    pvc = [d for _, d in _manifests() if d["kind"] == "PersistentVolumeClaim"][0]["metadata"]["name"]
    for name, doc in _manifests():
        if doc["kind"] == "PersistentVolumeClaim":
            continue
        for cluster in _cluster_specs(doc):
            assert cluster["authOptions"]["mode"] == "token", name
            assert cluster["rayVersion"] == importlib.import_module("ray").__version__, name
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), name
            gpus = [g for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
                    if "nvidia.com/gpu" in c["resources"]["limits"]]
            assert gpus, f"{name}: no GPU worker group"
        for group, container, pod in _containers(doc):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            shared = [mounts[v] for v, claim in claims.items() if claim == pvc and v in mounts]
            assert shared, f"{name} {group}: the shared volume {pvc} is not mounted"
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["RAYFINE_RUNS_DIR"].startswith(shared[0] + "/"), f"{name} {group}: runs dir off the shared volume"
            assert container["resources"]["limits"] and container["image"] == "rayfine:0.1.0", f"{name} {group}"
            assert container["workingDir"] == "/app", f"{name} {group}"


def test_the_image_holds_what_the_manifests_run():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    ray_version = importlib.import_module("ray").__version__
    assert f"FROM rayproject/ray:{ray_version}-" in dockerfile
    assert "WORKDIR /app" in dockerfile and re.search(r"COPY .*ray_jobs \./ray_jobs", dockerfile)
    assert f"ray[train,tune,serve,default]=={ray_version}" in (REPO / "pyproject.toml").read_text()


def test_the_rayjob_runs_the_pipeline_entrypoint_on_a_valid_config():
    from rayfine.config import load_config

    (job,) = [d for _, d in _manifests() if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "ray_jobs/pipeline.py"], argv
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist in the repository"
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers <= job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)


def test_the_rayservice_serves_through_rayfines_app_builder():
    from rayfine.config import ServeConfig

    (service,) = [d for _, d in _manifests() if d["kind"] == "RayService"]
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    mounts = {m["mountPath"] for _, c, _ in _containers(service) for m in c["volumeMounts"]}
    for app in apps:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)
        app_args = importlib.import_module(module).AppArgs.model_validate(app["args"])  # the builder's own arg model
        ServeConfig.model_validate(app_args.serve)  # every serve override is a real serve setting
        assert any(app_args.checkpoint.startswith(m + "/") for m in mounts), "the checkpoint is not on a mounted volume"


def test_the_rayservice_rolls_out_new_weights_through_user_config():
    """KubeRay resubmits serveConfigV2 when its text changes, but Serve compares the parsed config:
    only a changed deployment user_config reaches the running replicas (reconfigure). The manifest
    must carry the Classifier's user_config, as `rayfine serve --print-config` writes it, for its
    documented roll-out (change `version`) to do anything."""
    from rayfine.serve.app import DEPLOYMENT_NAME

    (service,) = [d for _, d in _manifests() if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (deployment,) = app["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME
    user_config = deployment["user_config"]
    assert user_config["checkpoint"] == app["args"]["checkpoint"] and isinstance(user_config["version"], str)
    assert "rollout" not in service["spec"]["serveConfigV2"].split("applications:")[0]  # no comment-only roll-out


# --- the launcher YAML -------------------------------------------------------------------------


def _launcher():
    return yaml.safe_load((REPO / "cluster" / "launcher" / "aws.yaml").read_text())


def test_the_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's ray-schema.json, as `ray up` does
    head, worker = (" ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    for needed in ("RAY_AUTH_MODE=token", "RAYFINE_RUNS_DIR=/mnt/rayfine/"):
        assert needed in head and needed in worker
    assert "--dashboard-host=127.0.0.1" in head
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token, in the container's home
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in config["available_node_types"].values())


def test_the_launcher_runs_every_node_in_the_kuberay_image_on_a_chosen_ami():
    """Without an ImageId, Ray 2.60's launcher picks its DEFAULT_AMI, an Ubuntu 18.04 Deep Learning
    AMI (glibc 2.27) on which the pinned torch wheel (manylinux_2_28) does not install: the nodes
    run the project's image (the KubeRay manifests' image, where rayfine is installed) on an
    explicitly chosen host AMI, and install nothing themselves."""
    config = _launcher()
    images = {c["image"] for _, doc in _manifests() if doc["kind"] != "PersistentVolumeClaim" for _, c, _ in _containers(doc)}
    docker = config["docker"]
    assert images == {docker["image"]} and docker["pull_before_run"] and docker["container_name"]
    assert not {"head_image", "worker_image"} & set(docker)
    assert "-v /mnt/rayfine:/mnt/rayfine" in docker["run_options"]  # the host's EFS mount, in the container
    assert any("mount -t nfs4" in c and "/mnt/rayfine" in c for c in config["initialization_commands"])  # on the host
    amis = {t["node_config"].get("ImageId") for t in config["available_node_types"].values()}
    assert len(amis) == 1 and re.fullmatch(r"ami-[0-9a-f]{8,17}", amis.pop())
    text = (REPO / "cluster" / "launcher" / "aws.yaml").read_text()
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in text and "aws ssm get-parameter" in text  # how to pick the id
    commands = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in config.get(k, [])]
    assert not [c for c in commands if "pip install" in c], commands  # the image has everything
    assert 'python -c "import rayfine"' in commands  # a plain rayproject/ray image fails `ray up`, not every job
    assert "rsync_exclude" not in config and "." not in config["file_mounts"].values()  # the code is the image's


def test_a_broken_launcher_yaml_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


# --- the local cluster scripts -----------------------------------------------------------------


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_the_local_cluster_scripts_parse(script):
    path = REPO / "cluster" / "local" / script
    assert path.is_file() and path.stat().st_mode & 0o111, f"{path} missing or not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_the_local_cluster_scripts_refuse_a_state_dir_another_account_could_write(tmp_path):
    """up.sh writes cluster.env there (users source it) and down.sh ends the sessions recorded there:
    a predictable /tmp path that another account made first, or can write, is refused by both."""
    import os
    import shutil
    import tempfile

    venv = tmp_path / "venv"  # a Ray that does nothing: the scripts must stop before they run it
    (venv / "bin").mkdir(parents=True)
    for tool in ("ray", "python"):
        (venv / "bin" / tool).write_text("#!/bin/sh\necho ran >> \"$(dirname \"$0\")/../ran\"\nexit 0\n")
        (venv / "bin" / tool).chmod(0o755)
    base = Path(tempfile.mkdtemp(prefix="rfstate-", dir="/tmp"))  # short: up.sh takes at most 40 characters

    def run(script: str, state: Path | str) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAYFINE_VENV": str(venv), "RAYFINE_CLUSTER_DIR": str(state), "HOME": str(tmp_path)}
        return subprocess.run(["bash", str(REPO / "cluster" / "local" / script)], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    try:
        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o777)  # as another account's `mkdir -m 777 /tmp/rayfine-cluster` leaves it
        (shared / "nodes").mkdir()
        (shared / "nodes" / "head.sid").write_text("1\n")  # a session planted for down.sh to end
        link = base / "link"
        link.symlink_to(shared)
        # (state dir, why up.sh refuses it, why down.sh does); a trailing slash must not hide the link
        cases = [(shared, "writable by other accounts: `chmod go-w", "writable by other accounts, who could"),
                 (link, "is a symbolic link", "is a symbolic link"), (f"{link}/", "is a symbolic link", "is a symbolic link")]
        if os.geteuid() == 0:  # only root can make a directory that another account owns
            theirs = base / "theirs"
            theirs.mkdir(mode=0o755)
            os.chown(theirs, 65534, 65534)
            cases.append((theirs, "not a directory of this account", "belongs to another account"))
        for state, up_reason, down_reason in cases:
            up = run("up.sh", state)
            assert up.returncode == 1 and up_reason in up.stderr, (state, up.stderr)
            down = run("down.sh", state)
            assert down.returncode == 1 and down_reason in down.stderr, (state, down.stderr)
        assert not (venv / "ran").exists() and not (shared / "cluster.env").exists()
        assert (shared / "nodes" / "head.sid").exists()  # down.sh ended nothing

        mine = base / "mine"  # a new state dir: this account's alone
        run("up.sh", mine)
        assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(base)
