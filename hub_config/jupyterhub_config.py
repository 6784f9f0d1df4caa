# JupyterHub configuration of Workbench: a thin loader.
# Everything is built from the platform YAML by workbench.hub (see src/workbench/hub.py);
# `workbench up` writes <state>/runtime.json and points WORKBENCH_RUNTIME at it.
from workbench.hub import configure_hub

configure_hub(c)  # noqa: F821 - `c` is provided by JupyterHub
