# JupyterHub configuration of Workbench on Kubernetes (the Helm chart's hub pod): a thin loader.
# The platform YAML is mounted from the chart's ConfigMap at /etc/workbench/platform.yaml
# ($WORKBENCH_PLATFORM); everything else (namespace, service URLs, database, secrets) comes from the
# environment the chart sets. The settings are built by workbench.kubernetes.hub.k8s_hub_settings (pure).
from workbench.kubernetes.hub import configure_k8s_hub

configure_k8s_hub(c)  # noqa: F821 - `c` is provided by JupyterHub
