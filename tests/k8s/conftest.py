"""The tests/k8s suite deploys the chart to a real cluster; it runs only when one is configured.

Needs: KUBECONFIG (a cluster where you may create namespaces and CRDs), and the workbench images built
from images/ and pushed where the cluster can pull them:

    WORKBENCH_K8S_REGISTRY=registry.example.edu/workbench   # images.registry (hub and base images)
    WORKBENCH_K8S_TAG=dev                                    # images.tag
    WORKBENCH_K8S_VALUES=extra-values.yaml                   # optional: more Helm values (storage class ...)

Without them every test is skipped, saying which is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {
    "KUBECONFIG": "a kube config for a test cluster",
    "WORKBENCH_K8S_REGISTRY": "the registry holding the workbench hub and base images (images.registry)",
    "WORKBENCH_K8S_TAG": "the tag of those images (images.tag)",
}


def pytest_collection_modifyitems(config, items):
    missing = [f"{name} ({what})" for name, what in REQUIRED.items() if not os.environ.get(name)]
    if not missing:
        return
    skip = pytest.mark.skip(reason="no Kubernetes cluster configured; set " + ", ".join(missing))
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tools() -> Path:
    """The folder with helm and kubectl (scripts/get-helm.sh), or HELM's folder."""
    if os.environ.get("HELM"):
        return Path(os.environ["HELM"]).parent
    proc = subprocess.run(
        [str(ROOT / "scripts" / "get-helm.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])
