"""Launching ``torchrun -m bagel_core.train`` in one Kubernetes pod through dagster-k8s Pipes.

``PipesK8sClient.run`` creates the pod, streams its log, waits for it to end and deletes it in a
``finally``: a cancelled Dagster run (or a failed step) deletes the pod, the kubelet sends SIGTERM to
torchrun (argv[0] of the container, so PID 1 with signal handlers of its own), torchrun stops its ranks,
and after ``terminationGracePeriodSeconds`` everything left in the container is SIGKILLed. Nothing can
be orphaned inside a pod; only a pod whose launching step died without running its ``finally`` (run
worker OOM-killed, node lost) keeps running, which ``active_deadline_s`` bounds.

Pipes messages travel in the pod log and a line counts only when it is pure JSON, so the command never
uses ``torchrun --tee``/``--redirects``/``--log_dir`` (they prefix or divert lines).

No ``from __future__ import annotations`` here: Dagster resolves resource fields from real annotations.
"""

import re
from pathlib import PurePosixPath
from typing import Any

import dagster as dg
from pydantic import Field

TRAIN_CONTAINER = "bagel-train"
# Directories that must outlive the pod: a flag whose value is written inside the pod is lost with it.
OUTPUT_FLAGS = ("--checkpoint_dir", "--results_dir")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([mkMGTPE]|[KMGTPE]i)?$")
_FOURTEEN_DAYS_S = 14 * 24 * 3600.0


class K8sTorchrunLauncher(dg.ConfigurableResource):
    """Runs torchrun (``--standalone``, one node) in one pod of the cluster through ``PipesK8sClient``.

    The pod must see the pipeline workspace at the *same absolute path* as this Dagster step does: the
    training arguments are absolute workspace paths (registry, manifest, run and checkpoint folders), so
    ``workspace_pvc`` is mounted at ``workspace_mount_path`` = the workspace root, and the checkpoints the
    pod writes are where the asset (and ``model_export``) look for them. Checkpoint or results folders
    outside every mounted volume are refused at launch: they would vanish with the pod."""

    image: str = ""  # the training image (bagel-pipeline installed: torch, bagel_core, dagster-pipes); required
    image_pull_policy: str = ""  # "" = the cluster default (Always for :latest, else IfNotPresent)
    # "" = the namespace the Dagster step itself runs in (in cluster), else the kubeconfig context's, else "default"
    namespace: str = ""
    gpus_per_pod: int = 8  # nvidia.com/gpu limit; must equal nproc_per_node; 0 = a CPU pod with no GPU resource
    cpu: str = ""  # e.g. "64"; requests = limits (Guaranteed QoS, static CPU pinning possible); "" = unset
    # e.g. "900Gi"; requests = limits; the /dev/shm emptyDir below counts against it; "" = unset
    memory: str = ""
    # memory-backed /dev/shm for DataLoader workers and NCCL (the container runtime gives 64 MiB); "" = none
    shm_size: str = "64Gi"
    # PersistentVolumeClaim holding the pipeline workspace (ReadWriteMany when Dagster's pods mount it too)
    workspace_pvc: str = ""
    workspace_mount_path: str = ""  # where it is mounted: the absolute workspace root, exactly as this step sees it
    service_account_name: str = ""  # "" = the namespace's default service account
    # e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    node_selector: dict[str, str] = Field(default_factory=dict)
    # raw k8s tolerations, e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    priority_class_name: str = ""  # lets a long training preempt (or resist preemption by) lower-priority pods
    image_pull_secrets: list[str] = Field(default_factory=list)  # names of docker-registry Secrets
    env: dict[str, str] = Field(default_factory=dict)  # extra env vars; they override the caller's training env
    env_from_secrets: list[str] = Field(default_factory=list)  # Secrets whose keys become env vars (WANDB_API_KEY)
    volumes: list[dict[str, Any]] = Field(default_factory=list)  # extra raw k8s volumes, e.g. a read-only data PVC
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)  # their mounts in the training container
    labels: dict[str, str] = Field(default_factory=dict)  # pod labels (kueue queue name, cost centre, ...)
    annotations: dict[str, str] = Field(default_factory=dict)  # pod annotations
    # after SIGTERM (pod deleted on cancel) torchrun stops its ranks (its own 30 s), then the kubelet SIGKILLs
    termination_grace_s: int = 120
    # backstop for a pod whose launching step died without deleting it: killed after this long; 0 = never
    active_deadline_s: int = 0
    # dagster-k8s waits 24 h by default, then fails the step and deletes the pod (a long training killed): that
    # wait starts once the log stream ends, so it spans the training when the stream drops early; 0 = no limit
    pod_wait_timeout_s: float = _FOURTEEN_DAYS_S
    poll_interval_s: float = 10.0  # seconds between pod status requests
    # True: always the in-cluster config; False: in cluster when KUBERNETES_SERVICE_HOST is set, else kubeconfig
    load_incluster_config: bool = False
    kubeconfig_file: str = ""  # "" = ~/.kube/config (or $KUBECONFIG) when not in cluster
    kube_context: str = ""  # "" = the kubeconfig's current context

    def command(self, nproc_per_node: int, train_args: list[str]) -> list[str]:
        """torchrun as the container's argv (no shell: the pod's SIGTERM reaches torchrun, which stops
        the ranks); its output goes unprefixed to the pod log, where Pipes reads its messages."""
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc_per_node}", "-m", "bagel_core.train", *train_args]

    def pod_spec(self, nproc_per_node: int) -> dict[str, Any]:
        """The ``base_pod_spec`` for ``PipesK8sClient.run`` (camelCase k8s PodSpec); image, command and env
        are added by dagster-k8s."""
        self._check_layout(nproc_per_node)
        for field in ("cpu", "memory", "shm_size"):
            value = getattr(self, field)
            if value and not _QUANTITY.match(value):
                raise dg.Failure(
                    f"k8s_launcher.{field} {value!r} is not a Kubernetes quantity (e.g. '64', '500m', '64Gi')"
                )
        resources: dict[str, dict[str, str]] = {}
        if self.gpus_per_pod > 0:
            resources.setdefault("limits", {})["nvidia.com/gpu"] = str(self.gpus_per_pod)
        for name, value in (("cpu", self.cpu), ("memory", self.memory)):
            if value:
                resources.setdefault("requests", {})[name] = value
                resources.setdefault("limits", {})[name] = value
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        if self.shm_size:
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}})
            mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        if self.workspace_pvc or self.workspace_mount_path:
            if not (self.workspace_pvc and PurePosixPath(self.workspace_mount_path).is_absolute()):
                raise dg.Failure(
                    "k8s_launcher: set both workspace_pvc (the claim's name) and workspace_mount_path (the absolute "
                    "pipeline workspace root, as this Dagster step sees it), so every training path is valid in the "
                    f"pod (workspace_pvc={self.workspace_pvc!r}, workspace_mount_path={self.workspace_mount_path!r})"
                )
            volumes.append({"name": "workspace", "persistentVolumeClaim": {"claimName": self.workspace_pvc}})
            mounts.append({"name": "workspace", "mountPath": self.workspace_mount_path})
        container: dict[str, Any] = {
            "name": TRAIN_CONTAINER,
            "resources": resources,
            "volumeMounts": [*mounts, *self.volume_mounts],
        }
        if self.image_pull_policy:
            container["imagePullPolicy"] = self.image_pull_policy
        if self.env_from_secrets:
            container["envFrom"] = [{"secretRef": {"name": name}} for name in self.env_from_secrets]
        spec: dict[str, Any] = {
            "restartPolicy": "Never",  # a failed training fails the step; Dagster retries, not the kubelet
            "terminationGracePeriodSeconds": self.termination_grace_s,
            "containers": [container],
            "volumes": [*volumes, *self.volumes],
        }
        optional = {
            "activeDeadlineSeconds": self.active_deadline_s or None,
            "serviceAccountName": self.service_account_name or None,
            "priorityClassName": self.priority_class_name or None,
            "nodeSelector": dict(self.node_selector) or None,
            "tolerations": [dict(t) for t in self.tolerations] or None,
            "imagePullSecrets": [{"name": name} for name in self.image_pull_secrets] or None,
        }
        spec.update({key: value for key, value in optional.items() if value is not None})
        return spec

    def pod_meta(self, run_id: str) -> dict[str, Any]:
        """Labels that find the pod of a run (``kubectl get pods -l dagster/run-id=<id>``), plus the user's."""
        labels = {"app.kubernetes.io/component": "bagel-train", "dagster/run-id": run_id, **self.labels}
        return {"labels": labels, **({"annotations": dict(self.annotations)} if self.annotations else {})}

    def pod_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """The training env, then ``self.env`` over it; unbuffered Python so log lines (and Pipes messages)
        reach the pod log as they are written. Pipes' own bootstrap variables may not be overridden."""
        merged = {"PYTHONUNBUFFERED": "1", **(env or {}), **self.env}
        clashes = sorted(key for key in merged if key.startswith("DAGSTER_PIPES_"))
        if clashes:
            raise dg.Failure(f"k8s_launcher: {clashes} are set by Dagster Pipes itself; remove them from env")
        return merged

    def unmounted_paths(self, train_args: list[str]) -> list[str]:
        """Absolute paths in the training arguments that lie on no volume mounted in the pod (they must then
        exist in the image)."""
        mounts = [PurePosixPath(m["mountPath"]) for m in self.persistent_mounts()]
        values = [arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg for arg in train_args]
        return [v for v in values if v.startswith("/") and not any(PurePosixPath(v).is_relative_to(m) for m in mounts)]

    def persistent_mounts(self) -> list[dict[str, Any]]:
        """The persistent mounts of the training container (the workspace and ``volume_mounts``; not /dev/shm)."""
        workspace = (
            [{"mountPath": self.workspace_mount_path}] if self.workspace_pvc and self.workspace_mount_path else []
        )
        return [*workspace, *self.volume_mounts]

    def run(
        self,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        train_args: list[str],
        nproc_per_node: int,
        nnodes: int,
        extras: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        """Run the training in one pod and wait for it; returns dagster's ``PipesClientCompletedInvocation``
        (``get_custom_messages()``, ``get_results()``). Blocks until the pod ends; the pod is deleted
        afterwards, also on cancellation or failure. A failed pod raises ``dg.Failure`` with its last log lines."""
        if nnodes != 1:
            raise dg.Failure(
                f"k8s_launcher runs one pod (nnodes=1), got nnodes={nnodes}: multi-node training on Kubernetes needs "
                "a JobSet or Kubeflow PyTorchJob launcher, which is not built yet. Use nnodes=1 with up to "
                "gpus_per_pod GPUs, or the local launcher (launch.backend: local) for a loopback multi-node rehearsal."
            )
        if not self.image:
            raise dg.Failure(
                "k8s_launcher.image is empty: set the training image (bagel-pipeline installed) in the "
                "resource config, e.g. resources: {k8s_launcher: {config: {image: {env: BAGEL_TRAIN_IMAGE}}}}"
            )
        spec = self.pod_spec(nproc_per_node)
        self._check_outputs(train_args)
        try:
            from dagster_k8s import PipesK8sClient
            from dagster_k8s.client import DagsterK8sError
        except ImportError as exc:
            raise dg.Failure(
                "training on Kubernetes needs dagster-k8s: pip install 'bagel-pipeline[k8s]'"
                f" ({type(exc).__name__}: {exc})"
            ) from exc
        if self.load_incluster_config and (self.kubeconfig_file or self.kube_context):
            raise dg.Failure("k8s_launcher: load_incluster_config excludes kubeconfig_file and kube_context")
        # The op context: dagster-k8s reads ``.op`` and ``.run_id``, deprecated on AssetExecutionContext.
        op_context = context.op_execution_context if isinstance(context, dg.AssetExecutionContext) else context
        pod_env = self.pod_env(env)
        elsewhere = self.unmounted_paths(train_args)
        if elsewhere:
            context.log.warning(
                f"k8s_launcher: these paths are on no mounted volume, so they must exist in the image: {elsewhere}"
            )
        client = PipesK8sClient(
            load_incluster_config=True if self.load_incluster_config else None,  # False would disable auto-detection
            kubeconfig_file=self.kubeconfig_file or None,
            kube_context=self.kube_context or None,
            poll_interval=self.poll_interval_s,
        )
        command = self.command(nproc_per_node, train_args)
        context.log.info(f"launching a pod of {self.image} ({self.gpus_per_pod} GPU): " + " ".join(command))
        try:
            return client.run(
                context=op_context,
                image=self.image,
                command=command,
                namespace=self.namespace or None,
                env=pod_env,
                base_pod_meta=self.pod_meta(op_context.run_id),
                base_pod_spec=spec,
                extras=extras,
                pod_wait_timeout=self.pod_wait_timeout_s,
            )
        except DagsterK8sError as exc:
            raise dg.Failure(description=f"training pod failed: {exc}") from exc

    def _check_layout(self, nproc_per_node: int) -> None:
        if nproc_per_node < 1:
            raise dg.Failure(f"nproc_per_node must be at least 1, got {nproc_per_node}")
        if self.gpus_per_pod < 0:
            raise dg.Failure(f"k8s_launcher.gpus_per_pod must be 0 (CPU pod) or more, got {self.gpus_per_pod}")
        if self.gpus_per_pod and nproc_per_node != self.gpus_per_pod:
            raise dg.Failure(
                f"launch.nproc_per_node={nproc_per_node} but k8s_launcher.gpus_per_pod={self.gpus_per_pod}: one rank "
                "per GPU, so make them equal (change launch.nproc_per_node, which the sampling manifest is planned "
                "for, or k8s_launcher.gpus_per_pod; gpus_per_pod=0 runs a CPU pod)"
            )

    def _check_outputs(self, train_args: list[str]) -> None:
        """Refuse checkpoint/results folders that would be written inside the pod and deleted with it."""
        mounts = [PurePosixPath(m["mountPath"]) for m in self.persistent_mounts()]
        for i, arg in enumerate(train_args):
            flag, _, value = arg.partition("=")
            if flag not in OUTPUT_FLAGS:
                continue
            value = value or (train_args[i + 1] if i + 1 < len(train_args) else "")
            path = PurePosixPath(value)
            if not (path.is_absolute() and any(path.is_relative_to(m) for m in mounts)):
                raise dg.Failure(
                    f"{flag} {value} is on no volume mounted in the training pod, so it would be lost with the pod: "
                    "set k8s_launcher.workspace_pvc and workspace_mount_path to the pipeline workspace root "
                    f"(mounted now: {[str(m) for m in mounts]})"
                )
