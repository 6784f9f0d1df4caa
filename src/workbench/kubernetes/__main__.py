"""``python -m workbench.kubernetes kube-controller [options]``: the namespaced gateway controller;
``python -m workbench.kubernetes dashguard``: the dashboard guard (configured by the chart's environment)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["dashguard"]:
        from workbench.kubernetes.guard import _guard_main

        return _guard_main()
    if not argv or argv[0] != "kube-controller":
        print(
            "usage: python -m workbench.kubernetes kube-controller -f hub_config/dask_gateway_config_k8s.py\n"
            "       python -m workbench.kubernetes dashguard",
            file=sys.stderr,
        )
        return 2
    from workbench.kubernetes.gateway import NamespacedKubeController

    NamespacedKubeController.launch_instance(argv[1:])
    return 0


if __name__ == "__main__":  # pragma: no cover - the controller and guard pods' entry point
    raise SystemExit(main())
