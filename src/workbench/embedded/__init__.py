"""The embedded engine: `workbench up` runs hub, proxy, gateway and services as local processes."""
