"""K8sTorchrunLauncher offline: the pod spec, the torchrun argv, the real dagster-k8s pod body built from
them, and ``PipesK8sClient.run`` end to end against a fake Kubernetes API (pod created, Pipes messages read
from its log, pod deleted on success, failure and cancellation)."""

import json
import sys

import dagster as dg
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR

from assets.k8s_launcher import TRAIN_CONTAINER, K8sTorchrunLauncher

kubernetes = pytest.importorskip("kubernetes")
dagster_k8s_pipes = pytest.importorskip("dagster_k8s.pipes")

WS = "/mnt/bagel/workspace"
ARGS = [
    "--dataset_info", f"{WS}/registry.json", "--manifest", f"{WS}/manifest",
    "--results_dir", f"{WS}/runs/abc/results", "--checkpoint_dir", f"{WS}/runs/abc/checkpoints",
    "--total_steps", "16", "--lr", "5e-3",
]  # fmt: skip
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_launcher(**overrides) -> K8sTorchrunLauncher:
    config = {
        "image": "registry.example/bagel-train:1",
        "namespace": "training",
        "gpus_per_pod": 8,
        "cpu": "96",
        "memory": "900Gi",
        "shm_size": "64Gi",
        "workspace_pvc": "bagel-workspace",
        "workspace_mount_path": WS,
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [TOLERATION],
        "service_account_name": "bagel-trainer",
        "image_pull_secrets": ["regcred"],
        "env_from_secrets": ["wandb"],
        "priority_class_name": "training-high",
        "active_deadline_s": 3600,
    }
    return K8sTorchrunLauncher(**{**config, **overrides})


def test_pod_spec_gpu_resources_shm_workspace_and_scheduling():
    spec = gpu_launcher().pod_spec(nproc_per_node=8)
    (container,) = spec["containers"]
    assert container["name"] == TRAIN_CONTAINER
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "900Gi"},
        "requests": {"cpu": "96", "memory": "900Gi"},
    }
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes[mounts[WS]]["persistentVolumeClaim"] == {"claimName": "bagel-workspace"}
    assert container["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [TOLERATION]
    assert spec["serviceAccountName"] == "bagel-trainer"
    assert spec["priorityClassName"] == "training-high"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_cpu_pod_has_no_gpu_resource_and_no_unset_fields():
    spec = K8sTorchrunLauncher(image="img", gpus_per_pod=0, shm_size="").pod_spec(nproc_per_node=2)
    assert "nvidia.com/gpu" not in json.dumps(spec)
    assert spec["containers"][0]["resources"] == {}
    assert spec["volumes"] == [] and spec["containers"][0]["volumeMounts"] == []
    assert not {"nodeSelector", "tolerations", "serviceAccountName", "activeDeadlineSeconds"} & set(spec)


def test_layout_and_config_errors_say_what_to_change():
    with pytest.raises(dg.Failure, match=r"nproc_per_node=4 but k8s_launcher.gpus_per_pod=8"):
        gpu_launcher().pod_spec(nproc_per_node=4)
    with pytest.raises(dg.Failure, match="at least 1"):
        gpu_launcher(gpus_per_pod=0).pod_spec(nproc_per_node=0)
    with pytest.raises(dg.Failure, match="workspace_mount_path"):
        gpu_launcher(workspace_mount_path="").pod_spec(nproc_per_node=8)
    with pytest.raises(dg.Failure, match="k8s_launcher.memory"):
        gpu_launcher(memory="lots").pod_spec(nproc_per_node=8)


def test_command_is_plain_torchrun_argv():
    command = gpu_launcher().command(8, ARGS)
    assert command[:5] == ["torchrun", "--standalone", "--nproc_per_node=8", "-m", "bagel_core.train"]
    assert command[5:] == ARGS
    assert not any(a.startswith(("--tee", "--redirects", "--log_dir", "--log-dir")) for a in command)


def test_real_build_pod_body_accepts_our_spec():
    launcher = gpu_launcher(annotations={"team": "multimodal"})
    command = launcher.command(8, ARGS)
    env = {DAGSTER_PIPES_CONTEXT_ENV_VAR: "ctx", DAGSTER_PIPES_MESSAGES_ENV_VAR: "msg", **launcher.pod_env()}
    pod = dagster_k8s_pipes.build_pod_body(
        pod_name="dagster-run-training-run-1",
        image=launcher.image,
        command=command,
        env_vars=env,
        base_pod_meta=launcher.pod_meta("0123-run"),
        base_pod_spec=launcher.pod_spec(8),
    )
    container = pod.spec.containers[0]
    assert container.name == TRAIN_CONTAINER and container.image == launcher.image
    assert container.command == command
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert {e.name: e.value for e in container.env} == env
    assert pod.spec.volumes[0].empty_dir.medium == "Memory"
    assert pod.spec.tolerations[0].effect == "NoSchedule"
    assert pod.metadata.labels["dagster/run-id"] == "0123-run"
    assert pod.metadata.labels["app.kubernetes.io/part-of"] == "dagster"  # dagster-k8s's labels kept
    # it serialises back to the camelCase manifest the API server receives
    manifest = kubernetes.client.ApiClient().sanitize_for_serialization(pod)
    assert manifest["spec"]["containers"][0]["volumeMounts"][1] == {"mountPath": WS, "name": "workspace"}
    assert manifest["metadata"]["annotations"] == {"team": "multimodal"}


def test_pod_env_merges_and_protects_pipes_variables():
    launcher = gpu_launcher(env={"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "8"})
    assert launcher.pod_env({"OMP_NUM_THREADS": "1", "A": "b"}) == {
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "8",
        "A": "b",
        "NCCL_DEBUG": "WARN",
    }
    with pytest.raises(dg.Failure, match="DAGSTER_PIPES_CONTEXT"):
        launcher.pod_env({DAGSTER_PIPES_CONTEXT_ENV_VAR: "x"})


@pytest.fixture
def fake_run(monkeypatch) -> list[dict]:
    """Replaces PipesK8sClient.run; records the client and the keyword arguments of each call."""
    calls: list[dict] = []

    def run(client, **kwargs):
        calls.append({"client": client, **kwargs})
        return "completed"

    monkeypatch.setattr(dagster_k8s_pipes.PipesK8sClient, "run", run)
    return calls


def test_run_passes_image_command_spec_namespace_env(fake_run):
    launcher = gpu_launcher(kube_context="gpu-cluster", poll_interval_s=5.0)
    out = launcher.run(dg.build_asset_context(), ARGS, 8, 1, extras={"k": 1}, env={"OMP_NUM_THREADS": "1"})
    assert out == "completed"
    (call,) = fake_run
    assert call["image"] == launcher.image
    assert call["command"] == launcher.command(8, ARGS)
    assert call["base_pod_spec"] == launcher.pod_spec(8)
    assert call["base_pod_meta"]["labels"]["dagster/run-id"] == "EPHEMERAL"
    assert call["namespace"] == "training"
    assert call["env"]["OMP_NUM_THREADS"] == "1" and call["env"]["PYTHONUNBUFFERED"] == "1"
    assert call["extras"] == {"k": 1}
    assert call["pod_wait_timeout"] == 14 * 24 * 3600
    assert isinstance(call["context"], dg.OpExecutionContext)  # not the asset context (deprecated .op/.run_id)
    client = call["client"]
    assert client.kube_context == "gpu-cluster" and client.poll_interval == 5.0
    assert client.load_incluster_config is None  # auto-detection kept


def test_run_refuses_bad_launches(fake_run, monkeypatch):
    ctx = dg.build_asset_context()
    with pytest.raises(dg.Failure, match=r"image.*BAGEL_TRAIN_IMAGE"):
        gpu_launcher(image="").run(ctx, ARGS, 8, 1)
    with pytest.raises(dg.Failure, match="JobSet"):
        gpu_launcher().run(ctx, ARGS, 8, 2)
    with pytest.raises(dg.Failure, match="gpus_per_pod"):
        gpu_launcher().run(ctx, ARGS, 4, 1)
    with pytest.raises(dg.Failure, match="lost with the pod"):
        gpu_launcher(workspace_pvc="", workspace_mount_path="").run(ctx, ARGS, 8, 1)
    with pytest.raises(dg.Failure, match="--checkpoint_dir"):
        gpu_launcher().run(ctx, [*ARGS, "--checkpoint_dir=/tmp/ckpt"], 8, 1)
    assert fake_run == []
    monkeypatch.setitem(sys.modules, "dagster_k8s", None)
    with pytest.raises(dg.Failure, match=r"bagel-pipeline\[k8s\]"):
        gpu_launcher().run(ctx, ARGS, 8, 1)


def test_unmounted_paths_lists_what_must_be_in_the_image():
    launcher = gpu_launcher(volume_mounts=[{"name": "data", "mountPath": "/data", "readOnly": True}])
    args = [*ARGS, "--model_path", "/models/bagel", "--vit_path=/data/siglip"]
    assert launcher.unmounted_paths(args) == ["/models/bagel"]


# --- PipesK8sClient.run end to end against a fake Kubernetes API -----------------------------------------

PIPES = "__dagster_pipes_version"


def _line(ts: int, payload) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps({PIPES: "0.1", **payload})
    return f"2026-01-01T00:00:{ts:02d}.000000Z {text}\n".encode()


class FakeCoreApi:
    """The CoreV1Api calls PipesK8sClient makes: create, list (status), read log, delete."""

    def __init__(self, exit_code: int = 0, log_error: BaseException | None = None):
        self.exit_code, self.log_error = exit_code, log_error
        self.created: list = []
        self.deleted: list[str] = []

    def create_namespaced_pod(self, namespace, body):
        self.created.append((namespace, body))

    def list_namespaced_pod(self, namespace, field_selector):
        V1 = kubernetes.client
        status = V1.V1ContainerStatus(
            name=TRAIN_CONTAINER,
            image="img",
            image_id="",
            ready=False,
            restart_count=0,
            state=V1.V1ContainerState(terminated=V1.V1ContainerStateTerminated(exit_code=self.exit_code)),
        )
        return V1.V1PodList(items=[V1.V1Pod(status=V1.V1PodStatus(container_statuses=[status]))])

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        if self.log_error is not None:
            raise self.log_error
        lines = [
            _line(1, {"method": "opened", "params": {}}),
            _line(2, "[rank0]: step 8 loss 1.23"),
            _line(3, {"method": "report_custom_message", "params": {"payload": {"event": "checkpoint", "step": 8}}}),
            _line(4, {"method": "closed", "params": {}}),
        ]
        return FakeStream(lines)

    def delete_namespaced_pod(self, name, namespace):
        self.deleted.append(name)


class FakeStream(list):
    @property
    def data(self) -> bytes:  # retrieve_pod_logs (failure path) reads .data
        return b"".join(self)


@pytest.fixture
def fake_cluster(monkeypatch):
    from dagster_k8s.client import DagsterKubernetesClient

    holder: dict = {}

    def production_client(*args, **kwargs):
        return DagsterKubernetesClient(
            batch_api=None, core_api=holder["api"], logger=lambda *a: None, sleeper=lambda s: None, timer=lambda: 0.0
        )

    monkeypatch.setattr(DagsterKubernetesClient, "production_client", staticmethod(production_client))
    monkeypatch.setattr(dagster_k8s_pipes.PipesK8sClient, "_load_k8s_config", lambda self: None)

    def install(api: FakeCoreApi) -> FakeCoreApi:
        holder["api"] = api
        return api

    return install


def _train_asset(seen: dict):
    @dg.asset(name="training_run")
    def training_run(context: dg.AssetExecutionContext, launcher: K8sTorchrunLauncher):
        invocation = launcher.run(context, ARGS, 8, 1, env={"OMP_NUM_THREADS": "1"})
        seen["messages"] = list(invocation.get_custom_messages())
        yield from invocation.get_results()

    return training_run


def test_pipes_k8s_client_end_to_end_with_fake_cluster(fake_cluster):
    api = fake_cluster(FakeCoreApi())
    seen: dict = {}
    with dg.instance_for_test() as instance:
        result = dg.materialize([_train_asset(seen)], instance=instance, resources={"launcher": gpu_launcher()})
    assert result.success
    assert seen["messages"] == [{"event": "checkpoint", "step": 8}]
    ((namespace, pod),) = api.created
    assert namespace == "training"
    container = pod.spec.containers[0]
    assert container.command == gpu_launcher().command(8, ARGS)
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    env = {e.name for e in container.env}
    assert {DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR, "OMP_NUM_THREADS", "PYTHONUNBUFFERED"} <= env
    assert pod.metadata.labels["dagster/run-id"] == result.run_id
    assert api.deleted == [pod.metadata.name]


@pytest.mark.parametrize(
    ("api", "error"),
    [
        (FakeCoreApi(exit_code=1), "training pod failed: Pod dagster-"),
        (FakeCoreApi(log_error=DagsterExecutionInterruptedError()), "DagsterExecutionInterruptedError"),
    ],
    ids=["training-fails", "run-cancelled"],
)
def test_pod_is_deleted_when_training_fails_or_run_is_cancelled(fake_cluster, api, error):
    fake_cluster(api)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [_train_asset({})], instance=instance, resources={"launcher": gpu_launcher()}, raise_on_error=False
        )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert error in failure.step_failure_data.error.message
    assert api.deleted == [api.created[0][1].metadata.name]


RUN_CONFIG_YAML = """
resources:
  k8s_launcher:
    config:
      image: {env: BAGEL_TRAIN_IMAGE}
      namespace: training
      gpus_per_pod: 8
      cpu: "96"
      memory: 900Gi
      shm_size: 64Gi
      workspace_pvc: bagel-workspace
      workspace_mount_path: /mnt/bagel/workspace
      node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      env_from_secrets: [wandb]
"""


def test_readme_run_config_resolves_with_image_from_the_environment(monkeypatch):
    yaml = pytest.importorskip("yaml")
    monkeypatch.setenv("BAGEL_TRAIN_IMAGE", "registry.example/bagel-train:2")
    seen: dict = {}

    @dg.asset
    def probe(k8s_launcher: K8sTorchrunLauncher) -> None:
        seen["image"], seen["spec"] = k8s_launcher.image, k8s_launcher.pod_spec(8)

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [probe],
            instance=instance,
            resources={"k8s_launcher": K8sTorchrunLauncher.configure_at_launch()},
            run_config=yaml.safe_load(RUN_CONFIG_YAML),
        )
    assert result.success
    assert seen["image"] == "registry.example/bagel-train:2"
    assert seen["spec"]["tolerations"] == [TOLERATION]
    assert seen["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
