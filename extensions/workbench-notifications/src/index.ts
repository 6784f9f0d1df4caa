/**
 * Workbench notifications in JupyterLab.
 *
 * Polls `<base_url>workbench/notifications` (the `workbench.lab` server extension, which asks the
 * hub's quota and sessions services with the server's token) at start and every 60 s, and shows
 * each new notification once with JupyterLab's notification API: critical ones as errors that
 * stay until dismissed, warnings and infos as toasts that close by themselves. Notifications
 * already shown are remembered in localStorage (per server), and forgotten once their service
 * stops reporting them, so one that comes back later is shown again.
 */

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { CockpitPanel, STYLE } from './panel';

const PLUGIN_ID = 'workbench-notifications:plugin';
const POLL_MS = 60_000;
/** JupyterLab truncates toast messages at this length; longer ones get a "Details" button. */
const TOAST_MAX = 140;

export interface IWorkbenchNotification {
  id: string;
  level: 'critical' | 'warning' | 'info';
  source: string;
  message: string;
  at?: string;
}

export interface IProblem {
  source: string;
  message: string;
}

export interface IAnswer {
  as_of: string;
  notifications: IWorkbenchNotification[];
  problems: IProblem[];
}

const TITLES: { [source: string]: string } = {
  quota: 'Budget',
  sessions: 'Session'
};

async function fetchNotifications(
  settings: ServerConnection.ISettings
): Promise<IAnswer> {
  const url = URLExt.join(settings.baseUrl, 'workbench', 'notifications');
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response);
  }
  return (await response.json()) as IAnswer;
}

function storageKey(settings: ServerConnection.ISettings): string {
  return `workbench-notifications:seen:${settings.baseUrl}`;
}

function loadSeen(key: string): Set<string> {
  try {
    const raw = window.localStorage.getItem(key);
    return new Set<string>(raw ? (JSON.parse(raw) as string[]) : []);
  } catch {
    return new Set<string>();
  }
}

function saveSeen(key: string, seen: Set<string>): void {
  try {
    window.localStorage.setItem(key, JSON.stringify([...seen]));
  } catch {
    // private mode or full storage: notifications may be shown again after a reload
  }
}

function show(note: IWorkbenchNotification): void {
  const title = TITLES[note.source] ?? note.source;
  const text = `${title}: ${note.message}`;
  const actions: Notification.IAction[] =
    text.length > TOAST_MAX
      ? [
          {
            label: 'Details',
            caption: 'Show the whole message',
            callback: () => {
              void showDialog({
                title: `${title} notification`,
                body: note.message,
                buttons: [Dialog.okButton()]
              });
            }
          }
        ]
      : [];
  if (note.level === 'critical') {
    Notification.error(text, { autoClose: false, actions });
  } else if (note.level === 'warning') {
    Notification.warning(text, { autoClose: 15_000, actions });
  } else {
    Notification.info(text, { actions });
  }
}

/** Show the notifications of `answer` not shown before; returns the ids to remember. */
export function showNew(answer: IAnswer, seen: Set<string>): Set<string> {
  const down = new Set(answer.problems.map(p => p.source));
  const current = new Set(answer.notifications.map(n => n.id));
  // keep what a service that did not answer had reported; forget what is no longer reported
  const kept = new Set(
    [...seen].filter(id => current.has(id) || down.has(id.split(':')[0]))
  );
  // most severe first from the server: show the least severe first so the most severe is on top
  for (const note of [...answer.notifications].reverse()) {
    if (!kept.has(note.id)) {
      show(note);
      kept.add(note.id);
    }
  }
  return kept;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    "Shows the workbench's budget and session notifications (quota and sessions services).",
  autoStart: true,
  activate: (app: JupyterFrontEnd): void => {
    const settings = app.serviceManager.serverSettings;
    const key = storageKey(settings);
    let reported = '';
    const poll = async (): Promise<void> => {
      try {
        const answer = await fetchNotifications(settings);
        saveSeen(key, showNew(answer, loadSeen(key)));
        const problems = answer.problems
          .map(p => `${p.source}: ${p.message}`)
          .join('; ');
        if (problems && problems !== reported) {
          console.warn(`workbench notifications: ${problems}`);
        }
        reported = problems;
      } catch (reason) {
        console.warn('workbench notifications: cannot ask the server', reason);
      }
    };
    void app.restored.then(() => {
      void poll();
      window.setInterval(() => void poll(), POLL_MS);
    });
  }
};

/** The Workbench side panel (the cockpit): profile, session, budgets, GPUs, Dask clusters. */
const cockpit: JupyterFrontEndPlugin<void> = {
  id: 'workbench-notifications:cockpit',
  description:
    'A side panel with the server, its session, the budgets, the GPUs and the Dask clusters of the user.',
  autoStart: true,
  optional: [ICommandPalette],
  activate: (app: JupyterFrontEnd, palette: ICommandPalette | null): void => {
    const style = document.createElement('style');
    style.textContent = STYLE;
    document.head.append(style);
    const panel = new CockpitPanel(app.serviceManager.serverSettings);
    app.shell.add(panel, 'left', { rank: 50 });
    const command = 'workbench:open-cockpit';
    app.commands.addCommand(command, {
      label: 'Workbench: show the cockpit (budgets, GPUs, Dask clusters)',
      execute: () => {
        app.shell.activateById(panel.id);
        void panel.refresh();
      }
    });
    palette?.addItem({ command, category: 'Workbench' });
    void app.restored.then(() => panel.start());
  }
};

export default [plugin, cockpit];
