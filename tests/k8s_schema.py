"""Validate Kubernetes objects offline against the real schemas, strictly.

- Custom resources (TrainJob, TrainingRuntime, ClusterTrainingRuntime, RayJob, RayCluster,
  JobSet) against the upstream CRDs' `openAPIV3Schema` in ../shared/k8s-crds/ (its README gives
  their releases), with unknown fields refused: the CRDs do not say `additionalProperties: false`,
  but the API server drops unknown fields (or rejects them under kubectl's strict validation), so
  a misspelt field would silently do nothing on a cluster.
- Core kinds (Pod, Service, StatefulSet, ConfigMap, RBAC...) against the Kubernetes OpenAPI
  schemas that `kubernetes-validate` ships, in its strict variant (unknown fields refused).

    problems(obj) -> ["StatefulSet/emu-s3: spec.template.spec.containers.0.imagePullPolicy: ..."]
"""

from __future__ import annotations

import copy
import functools
import gzip
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: shared/ lies beside the checkout (the project layout; CI copies it there too).
CRD_DIR = ROOT.parent / "shared" / "k8s-crds"
#: The Kubernetes version the core schemas are taken for (Kubeflow Trainer 2.3 and KubeRay 1.7
#: support it).
KUBERNETES_VERSION = "1.33.0"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def crd_dir_missing() -> str | None:
    """Why the CRD schemas cannot be read here, or None."""
    if not (CRD_DIR / "trainer.kubeflow.org_trainjobs.yaml").is_file():
        return f"the CRD schemas are not at {CRD_DIR} (../shared/k8s-crds beside the checkout)"
    return None


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, for every CRD file and served version."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml*")):
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        crd = yaml.load(text, Loader=_Loader)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return schemas


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse properties a schema does not name, except where it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            if isinstance(value, dict):
                _strict(value)
            elif isinstance(value, list):
                for item in value:
                    _strict(item)
    return schema


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in _crd_schemas()


def problems(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, as `Kind/name: path: message` lines ([] = valid)."""
    from jsonschema import Draft4Validator  # OpenAPI v3.0 is closest to JSON Schema draft 4

    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    if not (obj.get("metadata") or {}).get("name"):
        return [f"{where}: metadata.name is missing"]
    schema = _crd_schemas().get((obj.get("apiVersion"), obj.get("kind")))
    if schema is not None:
        validator = Draft4Validator(schema)
        return [f"{where}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes "
                f"{KUBERNETES_VERSION} or ../shared/k8s-crds"]
    return []
