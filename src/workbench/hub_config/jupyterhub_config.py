# JupyterHub configuration of Workbench: a thin loader.
# Everything is built from the platform YAML by workbench.embedded.hub (see src/workbench/embedded/hub.py);
# `workbench up` writes <state>/runtime.json and points WORKBENCH_RUNTIME at it.
from workbench.embedded.hub import configure_hub

configure_hub(c)  # noqa: F821 - `c` is provided by JupyterHub
