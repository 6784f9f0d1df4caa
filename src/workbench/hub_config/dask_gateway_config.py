# dask-gateway-server configuration of Workbench: a thin loader.
# Cluster options and limits come from the platform YAML (see src/workbench/gateway.py).
from workbench.gateway.config import configure_gateway

configure_gateway(c)  # noqa: F821 - `c` is provided by dask-gateway-server
