"""Workbench in JupyterLab: the jupyter_server extension ``workbench.lab`` and its prebuilt front end.

Two endpoints below the server's ``base_url``, both for the browser's session (jupyter_server's own
authentication; the services are asked with the server's ``$JUPYTERHUB_API_TOKEN``):

- ``workbench/notifications``: the quota and sessions services' notifications, merged
  (:mod:`workbench.lab.notifications`), shown as toasts;
- ``workbench/cockpit``: the side panel's document (profile and placement, session, budgets, GPUs,
  Dask clusters with scale/stop/new), :mod:`workbench.lab.cockpit`.

Installed with the ``workbench`` distribution: ``etc/jupyter/jupyter_server_config.d/workbench.json``
enables the extension, ``share/jupyter/labextensions/workbench-notifications`` is the prebuilt
JupyterLab extension (built from ``extensions/workbench-notifications`` by ``make lab-extension``).
"""

from __future__ import annotations

from workbench.lab.notifications import (
    DEFAULT_SOURCES,
    ENDPOINT,
    LEVEL_RANK,
    NotificationsHandler,
    SourceAnswer,
    WorkbenchNotifications,
    merge_notifications,
    notification_id,
    parse_answer,
    services_base_url,
)

__all__ = [
    "DEFAULT_SOURCES",
    "ENDPOINT",
    "LEVEL_RANK",
    "NotificationsHandler",
    "SourceAnswer",
    "WorkbenchNotifications",
    "merge_notifications",
    "notification_id",
    "parse_answer",
    "services_base_url",
]


def _jupyter_server_extension_points():
    return [{"module": "workbench.lab"}]


def _jupyter_labextension_paths():
    return [{"src": "../labextension", "dest": "workbench-notifications"}]


def _track_cpu(serverapp) -> None:
    """jupyter-resource-usage: report CPU use against ``$CPU_LIMIT`` (off by default there), unless configured.

    Set on the config (for when it loads after this extension) and on its settings object (when before).
    """
    if "track_cpu_percent" in serverapp.config.get("ResourceUseDisplay", {}):
        return
    serverapp.config.ResourceUseDisplay.track_cpu_percent = True
    display = serverapp.web_app.settings.get("jupyter_resource_usage_display_config")
    if display is not None and hasattr(display, "track_cpu_percent"):
        display.track_cpu_percent = True


def _load_jupyter_server_extension(serverapp) -> None:
    from jupyter_server.utils import url_path_join

    _track_cpu(serverapp)

    from workbench.lab.cockpit import WorkbenchCockpit, handlers

    notifier = WorkbenchNotifications(parent=serverapp)
    cockpit = WorkbenchCockpit(notifier, parent=serverapp)
    base = serverapp.web_app.settings["base_url"]
    route = url_path_join(base, ENDPOINT)
    serverapp.web_app.add_handlers(
        ".*$", [(route, NotificationsHandler, {"notifier": notifier}), *handlers(base, cockpit)]
    )
    serverapp.log.info(
        "workbench notifications at %s and cockpit at %s (services: %s)",
        route,
        url_path_join(base, "workbench/cockpit"),
        notifier.base_url() or "unknown",
    )
