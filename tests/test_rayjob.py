"""deploy/rayjob.yaml checked offline against KubeRay v1.7.0 (deploy/kuberay/, see its README).

Four layers, each a function returning a list of problems (empty = fine):

- ``schema_errors``: the CRD's v1 ``openAPIV3Schema`` (what the API server checks on apply),
  translated to JSON Schema 2020-12 and run with jsonschema.
- ``pruned_fields``: keys the schema does not declare. The API server does not reject them, it
  silently drops them (structural-schema pruning), so a typo such as
  ``shutdownAfterJobFinish`` would apply cleanly and leave the cluster running forever. Also
  duplicate keys in ``x-kubernetes-list-type: map|set`` lists (the API server rejects those).
- ``operator_errors``: the cheap rules the schema leaves to the operator's Go code, cited as
  ``validation.go:<line> <func>`` = ray-operator/controllers/ray/utils/validation.go at
  v1.7.0 (commit 59d663aeec13). The operator accepts the object and then marks the RayJob
  ``ValidationFailed``; only these checks catch them before a cluster is up.
- ``lakelens_errors``: what this project needs from the job (roles, GPUs, secrets, auth).

CEL rules (``x-kubernetes-validations``) are not evaluated: ``cel_fields`` lists the fields in
use that carry them, and the shipped job uses none.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "deploy" / "kuberay" / "ray.io_rayjobs.yaml"
JOB_PATH = ROOT / "deploy" / "rayjob.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB: 0.4 s vs 1.6 s

# ObjectMeta: the root `metadata` is `type: object` without properties in every CRD; the API
# server validates it as ObjectMeta and drops other keys.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink",
})

# constant.go: MaxRayClusterNameLength = 53 (63 - len("-serve-svc")); MaxRayJobNameLength =
# 53 - 6, because GenerateRayClusterName appends "-" + 5 random characters.
MAX_RAYJOB_NAME = 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # k8s validation.IsDNS1035Label, <= 63
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")  # IsQualifiedName's name
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # IsValidLabelValue
RAYJOB_CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # constant.go RayJobClusterSelectorKey
START_PARAM_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
# Fields whose operator feature gate is alpha and off by default (pkg/features/features.go).
GATED = {"networkPolicy": "RayClusterNetworkPolicy", "tlsOptions": "RayClusterMTLS",
         "historyServerOptions": "RayClusterHistoryServer"}

ROLE_LABEL = "lakelens/role"  # pipelines/cluster/placement.py ROLE_LABEL
GPU = "nvidia.com/gpu"
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY)", re.IGNORECASE)


# ---------------------------------------------------------------------------------- loading


@cache
def crd_schema(version: str = "v1") -> dict:
    """The CRD's openAPIV3Schema for `version`, as written (x- extensions kept)."""
    crd = yaml.load(CRD_PATH.read_text(), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def load_job() -> dict:
    docs = [d for d in yaml.load_all(JOB_PATH.read_text(), Loader=_Loader) if d is not None]
    assert len(docs) == 1, f"{JOB_PATH.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


@pytest.fixture
def job() -> dict:
    return load_job()  # a fresh copy per test: negative tests mutate it


# -------------------------------------------------------------------- layer 1: JSON Schema


def to_json_schema(node: dict) -> dict:
    """Translate a Kubernetes structural (OpenAPI v3 subset) schema to JSON Schema 2020-12.

    - ``x-kubernetes-int-or-string: true`` becomes ``anyOf: [integer, string]`` (controller-gen
      already writes that anyOf; a hand-written schema may not) with no ``type``.
    - ``nullable: true`` adds ``null`` to the type.
    - A ``required`` property that has a ``default`` is dropped from ``required``: the API
      server applies defaults before it validates (workerGroupSpecs' minReplicas/maxReplicas).
    - ``format: int32|int64`` is checked by the range checkers in ``FORMATS``.
    - ``x-kubernetes-*`` keys are left in; JSON Schema ignores unknown keywords.
    """
    out = {k: v for k, v in node.items()
           if k not in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")}
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        if "required" in node:
            out["required"] = [r for r in node["required"]
                               if "default" not in node["properties"].get(r, {})]
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    for kw in ("anyOf", "allOf", "oneOf"):
        if kw in node:
            out[kw] = [to_json_schema(s) for s in node[kw]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        if "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


FORMATS = FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


@cache
def validator() -> Draft202012Validator:
    schema = to_json_schema(crd_schema())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FORMATS)


def schema_errors(doc: dict) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator().iter_errors(doc)]


# --------------------------------------------------------- layer 2: pruning and list keys


def _nodes(value: object, schema: dict, path: str = ""):
    """(value, schema, path) for every node of `value` that `schema` describes."""
    yield value, schema, path
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _nodes(v, sub, f"{path}.{k}" if path else k)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield from _nodes(v, schema["items"], f"{path}[{i}]")


def pruned_fields(doc: dict, schema: dict | None = None) -> list[str]:
    """Paths of keys the API server would silently drop (not declared, nothing preserves them)."""
    out = []
    for value, node, path in _nodes(doc, schema or crd_schema()):
        if not isinstance(value, dict) or node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        if node.get("additionalProperties") not in (None, False):
            continue  # a map: any key
        allowed = set(node.get("properties", {}))
        if path == "metadata" or (path.endswith(".metadata") and not allowed):
            allowed |= OBJECT_META_FIELDS
        if node.get("x-kubernetes-embedded-resource"):
            allowed |= {"apiVersion", "kind", "metadata"}
        out += [f"{path}.{k}" if path else k for k in value if k not in allowed]
    return out


def duplicate_list_keys(doc: dict) -> list[str]:
    """x-kubernetes-list-type map (unique by list-map-keys, defaults applied) and set lists."""
    out = []
    for value, node, path in _nodes(doc, crd_schema()):
        kind = node.get("x-kubernetes-list-type")
        if not isinstance(value, list) or kind not in ("map", "set"):
            continue
        if kind == "map":
            props = node["items"].get("properties", {})
            names = node["x-kubernetes-list-map-keys"]
            keys = [tuple(item.get(k, props.get(k, {}).get("default")) for k in names) for item in value]
        else:
            keys = [yaml.safe_dump(item) for item in value]
        out += [f"{path}: duplicate {k}" for i, k in enumerate(keys) if k in keys[:i]]
    return out


def cel_fields(doc: dict) -> list[str]:
    """Fields set in `doc` whose schema has CEL rules (x-kubernetes-validations) we do not run."""
    return [p for _, node, p in _nodes(doc, crd_schema()) if node.get("x-kubernetes-validations")]


# ------------------------------------------------------------- layer 3: the operator's rules


def _version(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")  # k8s version.ParseGeneric
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _containers(template: dict | None) -> list[dict]:
    return ((template or {}).get("spec") or {}).get("containers") or []


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _group_errors(name: str, group: dict) -> list[str]:
    out = []
    params, resources, labels = group.get("rayStartParams") or {}, group.get("resources"), group.get("labels")
    # validation.go:60 validateRayGroupResources
    if resources and any(params.get(k) for k in START_PARAM_RESOURCES):
        out.append(f"{name}: resources set both in rayStartParams and in `resources`")
    # validation.go:72 validateRayGroupLabels
    if "labels" in params:
        out.append(f"{name}: rayStartParams['labels'] is not supported; use the group's `labels` field")
    for key, val in (labels or {}).items():
        prefix, _, short = key.rpartition("/")
        if not LABEL_NAME.match(short) or len(short) > 63 or (
                prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))):
            out.append(f"{name}: invalid label key {key!r}")
        if not isinstance(val, str) or len(val) > 63 or not LABEL_VALUE.match(val):
            out.append(f"{name}: invalid label value {val!r} for {key!r}")
    if not _containers(group.get("template")):
        out.append(f"{name}: the pod template has no container")  # validation.go:103
    return out


def cluster_errors(spec: dict, annotations: dict | None = None) -> list[str]:
    """validation.go:103 ValidateRayClusterSpec, the parts that need no cluster."""
    out = []
    head = spec.get("headGroupSpec") or {}
    out += _group_errors("head group", head)
    head_env = _env((_containers(head.get("template")) or [{}])[0])
    autoscaling = spec.get("enableInTreeAutoscaling") is True  # util.go IsAutoscalingEnabled
    version = (spec.get("autoscalerOptions") or {}).get("version")
    v2_env = (head_env.get(AUTOSCALER_V2_ENV) or {}).get("value") in ("1", "true")
    ray_version = _version(spec.get("rayVersion", ""))
    for g in spec.get("workerGroupSpecs") or []:
        name = f"worker group {g.get('groupName')}"
        out += _group_errors(name, g)
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            out.append(f"{name}: set both minReplicas and maxReplicas when autoscaling is disabled")
        if isinstance(lo, int) and lo < 0 or isinstance(hi, int) and hi < 0:
            out.append(f"{name}: negative minReplicas/maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        # validation.go:1006 validateWorkerGroupIdleTimeout
        idle = g.get("idleTimeoutSeconds")
        if idle is not None and (idle < 0 or not (version == "v2" or v2_env)):
            out.append(f"{name}: idleTimeoutSeconds needs autoscalerOptions.version v2 and >= 0")
        # validation.go:1113 validateWorkerGroupPriority
        if g.get("priority") and (not (version == "v2" or v2_env) or not ray_version
                                  or ray_version < (2, 56, 0)):
            out.append(f"{name}: priority needs autoscaler v2 and rayVersion >= 2.56.0")
        if g.get("suspend") and autoscaling:
            out.append(f"{name}: cannot be suspended with autoscaling enabled")
    if not autoscaling and v2_env:
        out.append(f"{AUTOSCALER_V2_ENV} is set but enableInTreeAutoscaling is not true")
    if autoscaling and version is not None and AUTOSCALER_V2_ENV in head_env:
        out.append(f"both autoscalerOptions.version and the head env {AUTOSCALER_V2_ENV} are set")
    if autoscaling and version == "v2":  # util.go IsAutoscalingV2Enabled
        templates = [("head", head.get("template"))] + [
            (g.get("groupName"), g.get("template")) for g in spec.get("workerGroupSpecs") or []]
        for name, t in templates:
            if ((t or {}).get("spec") or {}).get("restartPolicy") not in (None, "", "Never"):
                out.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
    if ((spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds") or 0) < 0:
        out.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in {e.get("name") for e in
                                              (spec.get("autoscalerOptions") or {}).get("env") or []}:
        out.append("autoscalerOptions.env must not set KUBERAY_GEN_AUTOSCALER_START_CMD")
    if (head.get("rayStartParams") or {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        out.append("redis username: use gcsFaultToleranceOptions.redisUsername")
    # The auth block of ValidateRayClusterSpec (util.go IsAuthEnabled: mode == "token").
    auth = spec.get("authOptions") or {}
    k8s_auth = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") == "token":
        if not ray_version or ray_version < (2, 52, 0):
            out.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")
        if k8s_auth and (not ray_version or ray_version < (2, 55, 0) or auth.get("secretName")):
            out.append("enableK8sTokenAuth needs rayVersion >= 2.55.0 and no secretName")
    elif k8s_auth:
        out.append("enableK8sTokenAuth needs authOptions.mode token")
    out += [f"{f} needs the operator feature gate {gate} (alpha, off by default)"
            for f, gate in GATED.items() if spec.get(f) is not None]
    return out


def operator_errors(doc: dict) -> list[str]:
    """What the KubeRay operator rejects after the API server accepted the object."""
    out = []
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    # validation.go:533 ValidateRayJobMetadata (also the webhook's only check).
    name = meta.get("name")
    if not name:
        out.append("metadata.name is required (generateName: the generated name must fit too)")
    else:
        if len(name) > MAX_RAYJOB_NAME:
            out.append(f"metadata.name {name!r} has {len(name)} > {MAX_RAYJOB_NAME} characters")
        if len(name) > 63 or not DNS1035.match(name):
            out.append(f"metadata.name {name!r} is not a DNS-1035 label")
    # validation.go:543 ValidateRayJobSpec
    shutdown, suspend = spec.get("shutdownAfterJobFinishes") is True, spec.get("suspend") is True
    ttl, backoff = spec.get("ttlSecondsAfterFinished") or 0, spec.get("backoffLimit")
    mode = spec.get("submissionMode", "K8sJobMode")
    selector, cluster = spec.get("clusterSelector") or {}, spec.get("rayClusterSpec")
    if suspend and not shutdown:
        out.append("suspend needs shutdownAfterJobFinishes: true")
    if ttl < 0:
        out.append("ttlSecondsAfterFinished must be non-negative")
    # validation.go:752 validateDeletionConfiguration
    if not shutdown and ttl > 0:
        out.append("ttlSecondsAfterFinished has no effect without shutdownAfterJobFinishes: true (rejected)")
    strategy = spec.get("deletionStrategy")
    if strategy is not None and strategy.get("deletionRules") and shutdown:
        out.append("deletionStrategy.deletionRules and shutdownAfterJobFinishes are mutually exclusive")
    if suspend and selector:
        out.append("clusterSelector mode does not support suspend")
    if cluster is None and not selector:
        out.append("one of rayClusterSpec or clusterSelector must be set")
    if cluster is not None and selector:
        # Stricter than the operator: it accepts both, validates rayClusterSpec, then runs on
        # the selected cluster and ignores rayClusterSpec (rayjob_controller.go checks
        # len(ClusterSelector) first everywhere). Almost always a mistake: exactly one.
        out.append("set exactly one of rayClusterSpec and clusterSelector, not both")
    if selector:
        if not selector.get(RAYJOB_CLUSTER_SELECTOR_KEY):
            out.append(f"clusterSelector needs a non-empty {RAYJOB_CLUSTER_SELECTOR_KEY!r}")
        if mode == "SidecarMode":
            out.append("clusterSelector is not supported in SidecarMode")
        if backoff:
            out.append("backoffLimit > 0 is incompatible with clusterSelector")
    if mode == "InteractiveMode" and backoff:
        out.append("backoffLimit > 0 is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None or spec.get("submitterConfig") is not None:
            out.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        head_spec = (((cluster or {}).get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        if head_spec.get("restartPolicy") not in (None, "", "Never"):
            out.append("SidecarMode needs the head restartPolicy Never or unset")
    if cluster is not None:
        if ((cluster.get("authOptions") or {}).get("enableK8sTokenAuth")) is True:
            out.append("enableK8sTokenAuth is not supported for RayJob")
        out += cluster_errors(cluster, meta.get("annotations"))
    try:  # dashboardclient.UnmarshalRuntimeEnvYAML: a YAML mapping
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "")
        if env is not None and not isinstance(env, dict):
            out.append("runtimeEnvYAML is not a YAML mapping")
    except yaml.YAMLError as e:
        out.append(f"runtimeEnvYAML is not valid YAML: {e}")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and spec[key] <= 0:
            out.append(f"{key} must be a positive integer")
    if backoff is not None and backoff < 0:
        out.append("backoffLimit must be non-negative")
    return out


# ---------------------------------------------------------------- layer 4: lakelens's needs


def _ray_containers(spec: dict) -> list[tuple[str, dict]]:
    cluster = spec.get("rayClusterSpec") or {}
    out = [("head", c) for c in _containers((cluster.get("headGroupSpec") or {}).get("template"))]
    for g in cluster.get("workerGroupSpecs") or []:
        out += [(g.get("groupName"), c) for c in _containers(g.get("template"))]
    return out


def _all_envs(spec: dict) -> list[tuple[str, dict]]:
    """Every env entry anywhere (containers, init containers, submitter, autoscaler)."""
    out = []
    for value, _, path in _nodes(spec, crd_schema()["properties"]["spec"], "spec"):
        if re.search(r"\.env\[\d+\]$", path) and isinstance(value, dict):
            out.append((path, value))
    return out


def _gpus(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get(GPU, 0))


def lakelens_errors(doc: dict) -> list[str]:
    out = []
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or {}
    groups = cluster.get("workerGroupSpecs") or []
    argv = shlex.split(spec.get("entrypoint") or "")
    if argv[:2] != ["lakelens", "annotate"] or "--out" not in argv:
        out.append(f"entrypoint is not `lakelens annotate ... --out DIR`: {argv[:3]}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        out.append("shutdownAfterJobFinishes must be true (GPU nodes outlive the job otherwise)")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        if key not in spec:
            out.append(f"spec.{key} must be set")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        out.append("rayClusterSpec.authOptions.mode must be token")
    if cluster.get("enableInTreeAutoscaling") is not True:
        out.append("enableInTreeAutoscaling must be true")
    # Head: no model work, and a dashboard reachable through the head Service (the submitter
    # Job and the operator call http://<cluster>-head-svc:8265; pod.go setMissingRayStartParams
    # defaults dashboard-host to 0.0.0.0 for that reason).
    head = cluster.get("headGroupSpec") or {}
    params = head.get("rayStartParams") or {}
    if params.get("dashboard-host", "0.0.0.0") in ("127.0.0.1", "localhost", "::1"):
        out.append("head dashboard-host on loopback: the submitter and the operator cannot reach it")
    if str(params.get("num-cpus", (head.get("resources") or {}).get("CPU"))) != "0":
        out.append("head must have num-cpus 0 (no Ray tasks or model actors on the head)")
    if any(_gpus(c) for c in _containers(head.get("template"))):
        out.append("head requests a GPU")
    # Worker roles: GPU groups are `model`, CPU groups `decode`; both present.
    roles = {}
    for g in groups:
        role = (g.get("labels") or {}).get(ROLE_LABEL)
        gpu = any(_gpus(c) for c in _containers(g.get("template")))
        roles.setdefault(role, []).append(g)
        if role != ("model" if gpu else "decode"):
            out.append(f"worker group {g.get('groupName')}: {ROLE_LABEL}={role!r} but gpu={gpu}")
        for c in _containers(g.get("template")):
            res = c.get("resources") or {}
            req = (res.get("requests") or {}).get(GPU)
            if gpu and req is not None and str(req) != str((res.get("limits") or {}).get(GPU)):
                out.append(f"{g.get('groupName')}: {GPU} requests must equal limits")
    if not any(_gpus(c) for g in groups for c in _containers(g.get("template"))):
        out.append(f"no worker group has a {GPU} limit")
    if not roles.get("model") or not roles.get("decode"):
        out.append(f"need worker groups labelled {ROLE_LABEL}=model (GPU) and =decode (CPU)")
    # --max-gpus must let the GPU actor pool grow to what the autoscaler can add.
    max_gpus = sum((g.get("maxReplicas") or 0) * (g.get("numOfHosts") or 1)
                   * max((_gpus(c) for c in _containers(g.get("template"))), default=0)
                   for g in roles.get("model", []))
    if max_gpus and "--max-gpus" in argv:
        given = "".join(argv[argv.index("--max-gpus") + 1:][:1])
        if given != str(max_gpus):
            out.append(f"--max-gpus {given} but the GPU groups can grow to {max_gpus}")
    elif max_gpus:
        out.append(f"entrypoint lacks --max-gpus {max_gpus}: the GPU pool would not grow")
    # One image, offline weights, S3 credentials everywhere a Ray process runs.
    containers = _ray_containers(spec)
    if len({c.get("image") for _, c in containers}) != 1:
        out.append("head and workers must run the same image")
    for group, c in containers:
        env = _env(c)
        if (env.get("TORCH_HOME") or {}).get("value") is None:
            out.append(f"{group}: TORCH_HOME (the weights baked into the image) is not set")
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef"):
                out.append(f"{group}: {var} must come from a Secret (valueFrom.secretKeyRef)")
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            if var in env:  # pod.go SetContainerTokenAuthEnvVars skips env vars already set
                out.append(f"{group}: do not set {var}; KubeRay injects it from authOptions")
    # No literal secret anywhere.
    for path, e in _all_envs(spec):
        if SECRET_ENV.search(e.get("name") or "") and "value" in e:
            out.append(f"{path} ({e.get('name')}): a literal value; use valueFrom.secretKeyRef")
    return out


# ------------------------------------------------------------------------------------ tests


def test_vendored_crd_is_rayjob_v1():
    s = crd_schema()
    spec = s["properties"]["spec"]["properties"]
    assert {"rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes"} <= set(spec)
    assert "authOptions" in spec["rayClusterSpec"]["properties"]
    assert "labels" in spec["rayClusterSpec"]["properties"]["workerGroupSpecs"]["items"]["properties"]
    assert "v1.7.0" in (CRD_PATH.parent / "README.md").read_text()


def test_job_matches_crd_schema(job):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert schema_errors(job) == []


def test_job_has_no_pruned_fields(job):
    assert pruned_fields(job) == []
    assert duplicate_list_keys(job) == []


def test_job_uses_no_fields_with_unchecked_cel_rules(job):
    assert cel_fields(job) == []


def test_job_passes_operator_rules(job):
    assert operator_errors(job) == []


def test_job_meets_lakelens_needs(job):
    assert lakelens_errors(job) == []


def test_worker_roles_gpus_and_secrets(job):
    """The brief's specifics, spelled out (lakelens_errors checks them generally)."""
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    roles = {name: g["labels"][ROLE_LABEL] for name, g in groups.items()}
    assert sorted(roles.values()) == ["decode", "model"]
    for name, g in groups.items():
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (int(limits.get(GPU, 0)) >= 1) == (roles[name] == "model")
        assert "labels" not in g["rayStartParams"]
        assert g["minReplicas"] <= g["maxReplicas"]
    assert len(job["metadata"]["name"]) <= MAX_RAYJOB_NAME
    for _, c in _ray_containers(job["spec"]):
        secret = _env(c)["AWS_SECRET_ACCESS_KEY"]
        assert "value" not in secret and secret["valueFrom"]["secretKeyRef"]["name"]
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S", JOB_PATH.read_text().replace(
        "--from-literal=AWS_SECRET_ACCESS_KEY=...", ""))


# ------------------------------------------------------------------------- negative tests


def _set(doc: dict, path: str, value: object) -> dict:
    """Set a dotted path (list indexes as numbers) in a copy of doc; value DELETE removes it."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()


def test_typo_key_is_pruned_not_rejected(job):
    bad = _set(job, "spec.shutdownAfterJobFinishes", DELETE)
    bad = _set(bad, "spec.ttlSecondsAfterFinished", DELETE)
    bad["spec"]["shutdownAfterJobFinish"] = True
    assert schema_errors(bad) == []  # the API server accepts it ...
    assert pruned_fields(bad) == ["spec.shutdownAfterJobFinish"]  # ... and drops the key


@pytest.mark.parametrize("path", [
    "spec.rayClusterSpec.workerGroupSpecs.0.minReplica",
    "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resource",
    "spec.rayClusterSpec.authOption",
    "metadata.label",
])
def test_nested_unknown_keys_are_reported(job, path):
    assert pruned_fields(_set(job, path, 1)) == [path.replace(".0.", "[0].")]


def test_maps_and_object_meta_take_any_key(job):
    doc = _set(job, "metadata.annotations", {"anything/goes": "x"})
    doc = _set(doc, "spec.rayClusterSpec.workerGroupSpecs.0.labels.extra", "y")
    assert pruned_fields(doc) == []


def test_preserve_unknown_fields_and_embedded_resources():
    schema = {"type": "object", "properties": {
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "embedded": {"type": "object", "x-kubernetes-embedded-resource": True,
                     "properties": {"spec": {"type": "object"}}},
        "opaque": {"type": "object"}}}
    doc = {"free": {"x": 1}, "embedded": {"apiVersion": "v1", "kind": "Pod", "other": 1},
           "opaque": {"y": 2}, "stray": 3}
    assert sorted(pruned_fields(doc, schema)) == ["embedded.other", "opaque.y", "stray"]


def test_duplicate_env_names_are_reported(job):
    env = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    bad = _set(job, "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.env",
               env + [{"name": "TORCH_HOME", "value": "/tmp"}])
    assert [e for e in duplicate_list_keys(bad) if "('TORCH_HOME',)" in e]


@pytest.mark.parametrize(("path", "value", "needle"), [
    ("spec.backoffLimit", "three", "is not of type 'integer'"),
    ("spec.activeDeadlineSeconds", 2**31, "is not a 'int32'"),
    ("spec.rayClusterSpec.authOptions.mode", "password", "is not one of"),
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu",
     "eight", "does not match"),
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu",
     [8], "is not valid under any of the given schemas"),
    ("spec.rayClusterSpec.headGroupSpec.template", DELETE, "'template' is a required property"),
    ("spec.shutdownAfterJobFinishes", "yes", "is not of type 'boolean'"),
])
def test_wrong_types_fail_schema(job, path, value, needle):
    errors = schema_errors(_set(job, path, value))
    assert any(needle in e for e in errors), errors


def test_int_or_string_accepts_both(job):
    limits = "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0.resources.limits.cpu"
    assert schema_errors(_set(job, limits, 16)) == []
    assert schema_errors(_set(job, limits, "16000m")) == []


def test_translation_of_k8s_extensions():
    s = to_json_schema({"type": "object", "required": ["a", "b"], "properties": {
        "a": {"x-kubernetes-int-or-string": True},
        "b": {"type": "integer", "default": 0},
        "c": {"type": "string", "nullable": True}}})
    v = Draft202012Validator(s, format_checker=FORMATS)
    assert v.is_valid({"a": 1}) and v.is_valid({"a": "1", "c": None})
    assert not v.is_valid({"a": 1.5}) and not v.is_valid({"b": 0})
    assert not Draft202012Validator({"format": "int32"}, format_checker=FORMATS).is_valid(-(2**31) - 1)


WG0 = "spec.rayClusterSpec.workerGroupSpecs.0"


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: _set(d, "metadata.name", "a" * 48), "48 > 47"),
    (lambda d: _set(d, "metadata.name", "9lakelens"), "DNS-1035"),
    (lambda d: _set(d, "metadata.name", "lakelens_annotate"), "DNS-1035"),
    (lambda d: _set(d, "metadata.name", "Lakelens"), "DNS-1035"),
    (lambda d: _set(d, "spec.clusterSelector", {"ray.io/cluster": "shared"}), "exactly one"),
    (lambda d: _set(d, "spec.rayClusterSpec", DELETE), "one of rayClusterSpec or clusterSelector"),
    (lambda d: _set(d, "spec.shutdownAfterJobFinishes", False), "without shutdownAfterJobFinishes"),
    (lambda d: _set(d, "spec.activeDeadlineSeconds", 0), "activeDeadlineSeconds must be a positive"),
    (lambda d: _set(d, "spec.backoffLimit", -1), "backoffLimit must be non-negative"),
    (lambda d: _set(d, "spec.submissionMode", "InteractiveMode"), "incompatible with InteractiveMode"),
    (lambda d: _set(d, "spec.runtimeEnvYAML", "pip: [a"), "not valid YAML"),
    (lambda d: _set(d, "spec.rayClusterSpec.rayVersion", "2.51.0"), "needs rayVersion >= 2.52.0"),
    (lambda d: _set(d, "spec.rayClusterSpec.rayVersion", DELETE), "needs rayVersion >= 2.52.0"),
    (lambda d: _set(d, "spec.rayClusterSpec.authOptions.enableK8sTokenAuth", True),
     "not supported for RayJob"),
    (lambda d: _set(d, f"{WG0}.minReplicas", 9), "minReplicas 9 > maxReplicas 4"),
    (lambda d: _set(d, f"{WG0}.rayStartParams.labels", "lakelens/role=model"),
     "rayStartParams['labels'] is not supported"),
    (lambda d: _set(d, f"{WG0}.labels", {"lakelens/role": "model!"}), "invalid label value"),
    (lambda d: _set(d, f"{WG0}.labels", {"-bad/role": "model"}), "invalid label key"),
    (lambda d: _set(_set(d, f"{WG0}.resources", {"GPU": "1"}), f"{WG0}.rayStartParams.num-gpus", "1"),
     "resources set both"),
    (lambda d: _set(d, f"{WG0}.template.spec.containers", []), "has no container"),
    (lambda d: _set(d, "spec.rayClusterSpec.headGroupSpec.template.spec.restartPolicy", "Always"),
     "restartPolicy"),
    (lambda d: _set(_set(d, f"{WG0}.idleTimeoutSeconds", 300),
                    "spec.rayClusterSpec.autoscalerOptions.version", DELETE),
     "idleTimeoutSeconds needs autoscalerOptions.version v2"),
    (lambda d: _set(_set(d, f"{WG0}.priority", 5), "spec.rayClusterSpec.rayVersion", "2.55.0"),
     "priority needs"),
    (lambda d: _set(d, "spec.rayClusterSpec.networkPolicy", {}), "RayClusterNetworkPolicy"),
])
def test_operator_rules_reject(job, mutate, needle):
    errors = operator_errors(mutate(job))
    assert any(needle in e for e in errors), errors


def test_ttl_without_shutdown_is_rejected(job):
    doc = _set(job, "spec.shutdownAfterJobFinishes", DELETE)
    assert any("ttlSecondsAfterFinished" in e for e in operator_errors(doc))
    assert not any("ttlSecondsAfterFinished" in e
                   for e in operator_errors(_set(doc, "spec.ttlSecondsAfterFinished", 0)))


def test_name_of_47_passes(job):
    assert operator_errors(_set(job, "metadata.name", "l" + "a" * 46)) == []


GPU_ENV = "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.env"


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: _set(d, f"{GPU_ENV}.2", {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}),
     "a literal value"),
    (lambda d: _set(d, f"{GPU_ENV}.1", {"name": "AWS_ACCESS_KEY_ID", "value": "AKIA"}),
     "must come from a Secret"),
    (lambda d: _set(d, "spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host", "127.0.0.1"),
     "loopback"),
    (lambda d: _set(d, "spec.rayClusterSpec.headGroupSpec.rayStartParams", {}), "num-cpus 0"),
    (lambda d: _set(d, "spec.rayClusterSpec.workerGroupSpecs.0.labels", {}), "gpu=True"),
    (lambda d: _set(d, "spec.rayClusterSpec.workerGroupSpecs.1.labels.lakelens/role", "model"),
     "gpu=False"),
    (lambda d: _set(d, "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources",
                    {"limits": {"cpu": "8"}}), f"no worker group has a {GPU} limit"),
    (lambda d: _set(d, "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 2), "--max-gpus 4 but"),
    (lambda d: _set(d, "spec.rayClusterSpec.authOptions", DELETE), "authOptions.mode must be token"),
    (lambda d: _set(d, "spec.rayClusterSpec.enableInTreeAutoscaling", False), "enableInTreeAutoscaling"),
    (lambda d: _set(d, "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0.image",
                    "other:1"), "same image"),
    (lambda d: _set(d, f"{GPU_ENV}.3", {"name": "RAY_AUTH_MODE", "value": "disabled"}),
     "do not set RAY_AUTH_MODE"),
    (lambda d: _set(d, "spec.submitterPodTemplate", {"spec": {"containers": [{
        "name": "s", "env": [{"name": "RAY_AUTH_TOKEN", "value": "t"}]}]}}), "a literal value"),
])
def test_lakelens_rules_reject(job, mutate, needle):
    errors = lakelens_errors(mutate(job))
    assert any(needle in e for e in errors), errors
