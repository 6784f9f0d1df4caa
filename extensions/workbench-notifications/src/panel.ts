/**
 * The Workbench cockpit: a side panel in JupyterLab.
 *
 * Reads ONE endpoint, `<base_url>workbench/cockpit` (the `workbench.lab` server extension, which
 * asks the quota service, the Dask Gateway and the GPUs with the server's token), every few
 * seconds and when the user clicks "Refresh", and shows: the profile and where the server runs,
 * the session's end and idle limits, the budgets of the user's groups (a bar per budget that turns
 * warning/critical at the policy's `warn_at`), this server's GPUs, and the user's Dask clusters
 * with scale and stop buttons and a "new cluster" form built from what the gateway allows.
 * A part whose service is down says so in one line; the rest still shows.
 */

import { ServerConnection } from '@jupyterlab/services';
import { URLExt } from '@jupyterlab/coreutils';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

export const REFRESH_MS = 5_000;

const ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
  'd="M3 13h2v8H3zm4-5h2v13H7zm4-5h2v18h-2zm4 8h2v10h-2zm4-3h2v13h-2z"/></svg>';

export const cockpitIcon = new LabIcon({
  name: 'workbench:cockpit',
  svgstr: ICON_SVG
});

interface IBudget {
  resource: 'gpu' | 'cpu';
  scope: 'group' | 'user';
  used_hours: number;
  limit_hours: number;
  fraction: number;
  exhausted: boolean;
  resets_at: string | null;
  period: string | null;
  level: 'ok' | 'warning' | 'critical';
}

interface IOption {
  field: string;
  label: string;
  type: string;
  default: number | string | null;
  min: number | null;
  max: number | null;
  options: string[] | null;
}

interface ICluster {
  name: string;
  status: string;
  options: { [key: string]: unknown };
  age_seconds: number | null;
  dashboard: string | null;
  dashboard_url: string | null;
  workers: number | null;
  cores: number | null;
  memory: number | null;
}

export interface ICockpit {
  as_of: string;
  server: {
    user: string;
    profile: string;
    display_name: string;
    engine: string;
    node: string;
    cpu: number | null;
    memory: number | null;
    limits: string;
    gpu: {
      type: string;
      display_name: string;
      count: number;
      resource: string;
      mig: boolean;
    } | null;
    gpu_devices: string[];
    charged_group: string | null;
    session: {
      max_age: number | null;
      ends_at: string | null;
      seconds_left?: number | null;
      idle_timeout: number | null;
      gpu_idle_timeout: number | null;
    };
  };
  budgets: {
    available: boolean;
    groups: { group: string; warn_at: number[]; budgets: IBudget[] }[];
  };
  gpus: {
    available: boolean;
    message: string;
    devices: {
      id: string;
      utilisation?: number | null;
      memory_used?: number | null;
      memory_total?: number | null;
    }[];
  };
  dask: { available: boolean; clusters: ICluster[]; options: IOption[] };
  notifications: { level: string; message: string }[];
  problems: { source: string; message: string }[];
}

const SOURCE_NAMES: { [source: string]: string } = {
  quota: 'Budgets',
  'dask-gateway': 'Dask Gateway',
  sessions: 'Session notices'
};

function el(
  tag: string,
  attrs: { [key: string]: string } = {},
  ...children: (Node | string | null)[]
): HTMLElement {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== null) {
      node.append(c);
    }
  }
  return node;
}

export function duration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined) {
    return '';
  }
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  if (d) {
    return `${d}d ${h}h`;
  }
  if (h) {
    return `${h}h ${m}m`;
  }
  return m ? `${m}m` : `${Math.floor(seconds)}s`;
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '?';
  }
  const gib = n / 2 ** 30;
  return gib >= 1 ? `${gib.toFixed(1)} GiB` : `${(n / 2 ** 20).toFixed(0)} MiB`;
}

function hours(n: number): string {
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

function day(iso: string | null): string {
  return iso ? iso.replace('T', ' ').replace(/:\d\dZ$/, ' UTC') : '';
}

export class CockpitPanel extends Widget {
  private _settings: ServerConnection.ISettings;
  private _timer = 0;
  private _busy = false;
  private _message = '';
  private _messageLevel = 'info';
  private _formKey = '';
  private _form: HTMLElement | null = null;
  doc: ICockpit | null = null;

  constructor(settings: ServerConnection.ISettings) {
    super();
    this._settings = settings;
    this.id = 'workbench-cockpit';
    this.addClass('wb-cockpit');
    this.title.icon = cockpitIcon;
    this.title.caption = 'Workbench: session, budgets, GPUs, Dask clusters';
    this.node.append(
      el(
        'div',
        { class: 'wb-head' },
        el('h2', {}, 'Workbench'),
        this._button('Refresh', 'wb-refresh', () => void this.refresh())
      ),
      el('div', { class: 'wb-body' })
    );
  }

  get body(): HTMLElement {
    return this.node.querySelector('.wb-body') as HTMLElement;
  }

  start(): void {
    void this.refresh();
    this._timer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refresh();
      }
    }, REFRESH_MS);
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  private _url(...parts: string[]): string {
    return URLExt.join(this._settings.baseUrl, 'workbench', 'cockpit', ...parts);
  }

  async refresh(): Promise<void> {
    if (this._busy) {
      return;
    }
    this._busy = true;
    try {
      const r = await ServerConnection.makeRequest(this._url(), {}, this._settings);
      if (!r.ok) {
        throw new Error(`the server answered ${r.status}`);
      }
      this.doc = (await r.json()) as ICockpit;
      this.render();
    } catch (reason) {
      this.body.replaceChildren(
        el('p', { class: 'wb-problem' }, `The workbench panel cannot reach this server: ${reason}`)
      );
    } finally {
      this._busy = false;
    }
  }

  private _button(label: string, cls: string, onClick: () => void): HTMLElement {
    const b = el('button', { class: `jp-mod-styled ${cls}`, type: 'button' }, label);
    b.addEventListener('click', onClick);
    return b;
  }

  private async _act(method: string, path: string[], body: object | null, done: string): Promise<void> {
    this._say(`${done.replace(/d$/, '')}ing …`, 'info');
    try {
      const r = await ServerConnection.makeRequest(
        this._url(...path),
        { method, body: body === null ? undefined : JSON.stringify(body) },
        this._settings
      );
      let text = '';
      try {
        const doc = await r.json();
        text = (doc && (doc.message || doc.reason)) || '';
      } catch {
        // 204 has no body
      }
      if (!r.ok) {
        this._say(`Refused (${r.status}): ${text}`, 'critical');
      } else {
        this._say(text || done, 'info');
      }
    } catch (reason) {
      this._say(`Failed: ${reason}`, 'critical');
    }
    await this.refresh();
  }

  private _say(message: string, level: string): void {
    this._message = message;
    this._messageLevel = level;
    const box = this.node.querySelector('.wb-action-message');
    if (box) {
      box.textContent = message;
      box.className = `wb-action-message wb-level-${level}`;
    }
  }

  render(): void {
    const doc = this.doc;
    if (!doc) {
      return;
    }
    // keep what the user is typing in the scale boxes across refreshes
    const kept: { [key: string]: string } = {};
    this.node.querySelectorAll<HTMLInputElement>('input[data-keep]').forEach(i => {
      kept[i.dataset.keep as string] = i.value;
    });
    const parts: HTMLElement[] = [];
    for (const p of doc.problems) {
      parts.push(
        el(
          'p',
          { class: 'wb-problem', 'data-source': p.source },
          `${SOURCE_NAMES[p.source] ?? p.source} unavailable: ${p.message}`
        )
      );
    }
    if (doc.notifications.length) {
      parts.push(
        this._section(
          'Notices',
          'wb-notices',
          ...doc.notifications.map(n =>
            el('p', { class: `wb-notice wb-level-${n.level}`, 'data-level': n.level }, n.message)
          )
        )
      );
    }
    parts.push(this._server(doc), this._budgets(doc), this._gpus(doc), this._dask(doc));
    parts.push(el('p', { class: 'wb-asof' }, `as of ${day(doc.as_of)}`));
    this.body.replaceChildren(...parts);
    this.node.querySelectorAll<HTMLInputElement>('input[data-keep]').forEach(i => {
      const v = kept[i.dataset.keep as string];
      if (v !== undefined) {
        i.value = v;
      }
    });
  }

  private _section(title: string, cls: string, ...children: (Node | string | null)[]): HTMLElement {
    return el('section', { class: `wb-section ${cls}` }, el('h3', {}, title), ...children);
  }

  private _server(doc: ICockpit): HTMLElement {
    const s = doc.server;
    const rows: [string, string][] = [
      ['Profile', `${s.display_name} (${s.profile})`],
      ['Runs on', `${s.engine || 'unknown engine'} · ${s.node}`],
      ['Resources', `${s.cpu ?? '?'} CPU · ${s.memory ? `${(s.memory / 1e9).toFixed(s.memory % 1e9 ? 1 : 0)} GB` : '?'}`]
    ];
    if (s.gpu) {
      rows.push([
        'GPU',
        s.gpu.mig
          ? `MIG slice ${s.gpu.resource} (${s.gpu.display_name})`
          : `${s.gpu.count}× ${s.gpu.display_name}`
      ]);
    } else {
      rows.push(['GPU', 'none']);
    }
    if (s.charged_group) {
      rows.push(['Charged to', s.charged_group]);
    }
    const sess = s.session || ({} as ICockpit['server']['session']);
    rows.push([
      'Session',
      sess.ends_at
        ? `ends in ${duration(sess.seconds_left)} (at ${day(sess.ends_at)}; limit ${duration(sess.max_age)})`
        : 'no session limit'
    ]);
    const idle: string[] = [];
    if (sess.idle_timeout) {
      idle.push(`stopped after ${duration(sess.idle_timeout)} idle`);
    }
    if (sess.gpu_idle_timeout) {
      idle.push(`GPUs idle ${duration(sess.gpu_idle_timeout)}`);
    }
    rows.push(['Idle limits', idle.join(' · ') || 'none']);
    const table = el('table', { class: 'wb-facts' });
    for (const [k, v] of rows) {
      table.append(el('tr', {}, el('th', {}, k), el('td', { 'data-fact': k }, v)));
    }
    return this._section('This server', 'wb-server', table);
  }

  private _budgets(doc: ICockpit): HTMLElement {
    const b = doc.budgets;
    if (!b.available) {
      return this._section('Budgets', 'wb-budgets', el('p', { class: 'wb-muted' }, 'Budgets cannot be shown right now (see above).'));
    }
    if (!b.groups.length) {
      return this._section('Budgets', 'wb-budgets', el('p', { class: 'wb-muted' }, 'Your groups have no budget.'));
    }
    const out: HTMLElement[] = [];
    for (const g of b.groups) {
      const items: HTMLElement[] = [el('h4', {}, g.group)];
      for (const x of g.budgets) {
        const pct = Math.min(100, Math.round(x.fraction * 100));
        const label = `${x.resource.toUpperCase()}-hours${x.scope === 'user' ? ' (your share)' : ''}`;
        items.push(
          el(
            'div',
            {
              class: `wb-budget wb-level-${x.level}`,
              'data-group': g.group,
              'data-resource': x.resource,
              'data-scope': x.scope,
              'data-level': x.level
            },
            el('div', { class: 'wb-budget-label' }, label),
            el('div', { class: 'wb-bar' }, el('div', { class: 'wb-bar-fill', style: `width:${pct}%` })),
            el(
              'div',
              { class: 'wb-budget-text' },
              `${hours(x.used_hours)} / ${x.limit_hours} h (${Math.round(x.fraction * 100)}%)` +
                (x.exhausted ? ' · spent' : '') +
                (x.resets_at ? ` · resets ${day(x.resets_at)}` : ' · never resets')
            )
          )
        );
      }
      out.push(el('div', { class: 'wb-group' }, ...items));
    }
    return this._section('Budgets this period', 'wb-budgets', ...out);
  }

  private _gpus(doc: ICockpit): HTMLElement {
    const g = doc.gpus;
    const items: HTMLElement[] = [];
    if (g.message) {
      items.push(el('p', { class: g.available ? 'wb-muted wb-gpu-message' : 'wb-problem wb-gpu-message' }, g.message));
    }
    for (const d of g.devices) {
      const util = d.utilisation === null || d.utilisation === undefined ? '?' : `${Math.round(d.utilisation)}%`;
      const mem =
        d.memory_total ? `${bytes(d.memory_used)} / ${bytes(d.memory_total)}` : 'memory unknown';
      items.push(
        el(
          'div',
          { class: 'wb-gpu', 'data-device': d.id },
          el('code', {}, d.id),
          ` · utilisation ${util} · ${mem}`
        )
      );
    }
    return this._section('GPUs', 'wb-gpus', ...items);
  }

  private _dask(doc: ICockpit): HTMLElement {
    const d = doc.dask;
    const items: HTMLElement[] = [];
    if (!d.available) {
      items.push(el('p', { class: 'wb-muted' }, 'Dask clusters cannot be shown right now (see above).'));
      return this._section('Dask clusters', 'wb-dask', ...items);
    }
    if (!d.clusters.length) {
      items.push(el('p', { class: 'wb-muted wb-no-clusters' }, 'No Dask cluster running.'));
    }
    for (const c of d.clusters) {
      const scale = el('input', {
        type: 'number',
        min: '0',
        class: 'wb-scale-count',
        'data-keep': `scale:${c.name}`,
        value: String(c.workers ?? 0)
      }) as HTMLInputElement;
      const facts = [
        c.status,
        `${c.workers ?? '?'} workers`,
        `${c.cores ?? '?'} cores`,
        bytes(c.memory),
        c.age_seconds !== null ? `up ${duration(c.age_seconds)}` : ''
      ].filter(Boolean);
      items.push(
        el(
          'div',
          { class: 'wb-cluster', 'data-name': c.name, 'data-workers': String(c.workers ?? '') },
          el('div', { class: 'wb-cluster-name' }, el('code', {}, c.name)),
          el('div', { class: 'wb-cluster-facts' }, facts.join(' · ')),
          el(
            'div',
            { class: 'wb-cluster-actions' },
            c.dashboard_url
              ? el('a', { href: c.dashboard_url, target: '_blank', rel: 'noopener', class: 'wb-dashboard' }, 'Dashboard')
              : null,
            scale,
            this._button('Scale', 'wb-scale', () =>
              void this._act('POST', ['clusters', c.name, 'scale'], { count: parseInt(scale.value, 10) }, 'Scaled')
            ),
            this._button('Stop', 'wb-stop', () => void this._act('DELETE', ['clusters', c.name], null, 'Stopped'))
          )
        )
      );
    }
    items.push(this._newClusterForm(d.options));
    items.push(el('p', { class: `wb-action-message wb-level-${this._messageLevel}` }, this._message));
    return this._section('Dask clusters', 'wb-dask', ...items);
  }

  private _newClusterForm(options: IOption[]): HTMLElement {
    const key = JSON.stringify(options);
    if (this._form && key === this._formKey) {
      return this._form; // the same fields: keep what the user typed
    }
    const form = el('form', { class: 'wb-new-cluster' }, el('h4', {}, 'New cluster'));
    const inputs: { [field: string]: HTMLInputElement | HTMLSelectElement } = {};
    for (const o of options) {
      let input: HTMLInputElement | HTMLSelectElement;
      let limits = '';
      if (o.type === 'select' && o.options) {
        input = el('select', { name: o.field }) as HTMLSelectElement;
        for (const v of o.options) {
          input.append(el('option', { value: v }, v));
        }
        input.value = String(o.default ?? '');
      } else {
        const attrs: { [key: string]: string } = { name: o.field, type: 'number', value: String(o.default ?? '') };
        attrs.step = o.type === 'int' ? '1' : 'any';
        if (o.min !== null && o.min !== undefined) {
          attrs.min = String(o.min);
        }
        if (o.max !== null && o.max !== undefined) {
          attrs.max = String(o.max);
        }
        input = el('input', attrs) as HTMLInputElement;
        limits = `${o.min ?? ''}–${o.max ?? ''}`;
      }
      inputs[o.field] = input;
      form.append(
        el('label', { class: 'wb-field' }, el('span', {}, o.label), input, el('small', { class: 'wb-limits' }, limits ? `limit ${limits}` : ''))
      );
    }
    const create = this._button('Create cluster', 'wb-create', () => {
      const values: { [field: string]: unknown } = {};
      for (const o of options) {
        const raw = inputs[o.field].value;
        values[o.field] = o.type === 'int' ? parseInt(raw, 10) : o.type === 'float' ? parseFloat(raw) : raw;
      }
      void this._act('POST', ['clusters'], { options: values }, 'Created');
    });
    form.append(create);
    if (!options.length) {
      form.append(el('p', { class: 'wb-muted' }, 'The gateway offers no options to your groups.'));
    }
    form.addEventListener('submit', e => e.preventDefault());
    this._form = form;
    this._formKey = key;
    return form;
  }
}

export const STYLE = `
.wb-cockpit { overflow-y: auto; padding: 8px 12px; font-size: var(--jp-ui-font-size1); color: var(--jp-ui-font-color1); background: var(--jp-layout-color1); }
.wb-cockpit .wb-head { display: flex; align-items: center; justify-content: space-between; }
.wb-cockpit h2 { font-size: 1.3em; margin: 4px 0; }
.wb-cockpit h3 { font-size: 1.05em; margin: 12px 0 4px; border-bottom: 1px solid var(--jp-border-color2); }
.wb-cockpit h4 { margin: 6px 0 2px; }
.wb-cockpit .wb-facts th { text-align: left; padding-right: 8px; font-weight: 600; vertical-align: top; white-space: nowrap; }
.wb-cockpit .wb-problem { color: var(--jp-error-color1); margin: 4px 0; }
.wb-cockpit .wb-muted, .wb-cockpit .wb-asof { color: var(--jp-ui-font-color2); }
.wb-cockpit .wb-budget { margin: 4px 0 8px; }
.wb-cockpit .wb-bar { height: 10px; border-radius: 5px; background: var(--jp-layout-color3); overflow: hidden; }
.wb-cockpit .wb-bar-fill { height: 100%; background: var(--jp-success-color1); }
.wb-cockpit .wb-level-warning .wb-bar-fill { background: var(--jp-warn-color1); }
.wb-cockpit .wb-level-critical .wb-bar-fill { background: var(--jp-error-color1); }
.wb-cockpit .wb-level-critical .wb-budget-text { color: var(--jp-error-color1); font-weight: 600; }
.wb-cockpit .wb-cluster { border: 1px solid var(--jp-border-color2); border-radius: 4px; padding: 4px 6px; margin: 4px 0; }
.wb-cockpit .wb-cluster-name { word-break: break-all; }
.wb-cockpit .wb-cluster-actions { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; margin-top: 4px; }
.wb-cockpit .wb-scale-count { width: 4em; }
.wb-cockpit a.wb-dashboard { color: var(--jp-content-link-color); text-decoration: underline; margin-right: 4px; }
.wb-cockpit .wb-field { display: grid; grid-template-columns: 1fr 6em; gap: 2px 6px; align-items: center; margin: 2px 0; }
.wb-cockpit .wb-field small { grid-column: 1 / 3; color: var(--jp-ui-font-color2); }
.wb-cockpit .wb-action-message.wb-level-critical { color: var(--jp-error-color1); }
.wb-cockpit .wb-notice { margin: 4px 0; padding: 4px 6px; border-left: 4px solid var(--jp-info-color1); background: var(--jp-layout-color2); }
.wb-cockpit .wb-notice.wb-level-warning { border-left-color: var(--jp-warn-color1); }
.wb-cockpit .wb-notice.wb-level-critical { border-left-color: var(--jp-error-color1); }
`;
