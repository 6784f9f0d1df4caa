"""The Kubernetes engine: hub, gateway and guard settings read from the chart's environment."""
