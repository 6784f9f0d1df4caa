# dask-gateway-server configuration of Workbench on Kubernetes: a thin loader, for both the gateway API
# server (dask-gateway-server -f ...) and the controller (python -m workbench.kubernetes.hub kube-controller -f ...).
# Cluster options and limits come from the mounted platform YAML; see workbench.kubernetes.hub.k8s_gateway_settings.
from workbench.kubernetes.gateway import configure_k8s_gateway

configure_k8s_gateway(c)  # noqa: F821 - `c` is provided by dask-gateway-server
