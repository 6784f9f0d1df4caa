"""`workbench job …`: submit (now or on a cron schedule), list, cancel notebook jobs and read their logs, through the hub's jobs service.

The token is the user's own: ``$JUPYTERHUB_API_TOKEN`` (set in every notebook server) or ``--token-file``; a
token is never taken on the command line (it would show in ``ps`` and the shell's history).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from workbench.courses.links import DEFAULT_HUB_URL, hub_base
from workbench.jobs.model import JobError, check_notebook_path, parse_parameters
from workbench.names import JOBS_SERVICE


def add_job_arguments(parser) -> None:
    parser.allow_abbrev = False  # `--token` must not be read as `--token-file`: no token on the command line
    parser.add_argument(
        "--hub-url",
        default=os.environ.get("JUPYTERHUB_PUBLIC_URL") or DEFAULT_HUB_URL,
        help=f"the hub's address (default: $JUPYTERHUB_PUBLIC_URL, else {DEFAULT_HUB_URL})",
    )
    parser.add_argument("--token-file", help="a file holding your hub token (default: $JUPYTERHUB_API_TOKEN)")
    sub = parser.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    s = sub.add_parser("submit", help="run a notebook of your home as a batch job")
    s.add_argument("notebook", help="path relative to your home, e.g. analysis/fit.ipynb")
    s.add_argument("--profile", required=True, help="a profile you are entitled to (see the spawn form)")
    s.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE", help="papermill-style")
    s.add_argument("--time", help="time limit, e.g. 2h or 90m (default 1h, at most your group's limit)")
    s.add_argument("--name", help="folder name under ~/jobs (default: the notebook's name)")
    s.add_argument("--course", help="instructors: run it for every student of COURSE, charged to the course")
    s.add_argument("--schedule", metavar="CRON", help="run it at each time of a cron schedule, e.g. '0 3 * * *'")
    s.add_argument("--timezone", help="the schedule's IANA time zone (default UTC), e.g. Europe/Zurich")
    sub.add_parser("list", help="your jobs: state, duration, GPU-hours")
    sub.add_parser("schedules", help="your scheduled jobs (job definitions): schedule, next run, last error")
    sub.add_parser("unschedule", help="delete a scheduled job (runs already submitted stay)").add_argument("job_id")
    for action, text in (("cancel", "cancel a job"), ("logs", "print a job's log"), ("rerun", "run a job again")):
        sub.add_parser(action, help=text).add_argument("job_id")
    o = sub.add_parser("output", help="download the executed notebook")
    o.add_argument("job_id")
    o.add_argument("-o", "--output", help="file to write (default: the notebook's name)")
    parser.set_defaults(func=cmd_job)


def read_token(token_file: str | None, environ=None) -> str:
    env = os.environ if environ is None else environ
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise JobError(f"--token-file: cannot read {token_file}: {e.strerror}") from None
        if not token:
            raise JobError(f"--token-file: {token_file} is empty; put your hub token (from /hub/token) in it")
        return token
    token = env.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise JobError("no token: set $JUPYTERHUB_API_TOKEN (it is set in your notebook server) or pass --token-file")
    return token


def jobs_url(hub_url: str, *parts: str) -> str:
    return "/".join([f"{hub_base(hub_url)}/services/{JOBS_SERVICE}/api/jobs", *parts])


def format_jobs(jobs: list[dict]) -> str:
    """A table of jobs (pure)."""
    head = f"{'ID':<13}{'USER':<12}{'NAME':<20}{'STATE':<11}{'DURATION':>9} {'GPU-H':>8}  REASON / FOLDER"
    lines = [head]
    for j in jobs:
        secs = int(j["duration_seconds"])
        dur = f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
        note = j["reason"] if j["state"] == "queued" and j["reason"] else j["folder"]
        lines.append(
            f"{j['id']:<13}{j['user'][:11]:<12}{j['name'][:19]:<20}{j['state']:<11}{dur:>9} {j['gpu_hours']:>8.3f}  {note}"
        )
    return "\n".join(lines)


def cmd_job(args) -> int:
    import requests

    try:
        body = None
        if args.job_command == "submit":
            body = {
                "notebook": check_notebook_path(args.notebook),
                "profile": args.profile,
                "parameters": parse_parameters(args.parameter),
                "time": args.time,
                "name": args.name,
            }
            if args.course:
                body["course"] = args.course
            if args.schedule or args.timezone:
                from workbench.jobs.schedules import check_schedule, check_timezone

                if args.course:
                    raise JobError("--schedule: scheduled jobs run for yourself; leave out --course")
                body["schedule"] = check_schedule(args.schedule)
                body["timezone"] = check_timezone(args.timezone)
        token = read_token(args.token_file)
    except (JobError, ValueError) as e:
        print(f"workbench job: {e}", file=sys.stderr)
        return 2
    headers = {"Authorization": f"token {token}"}
    c = args.job_command
    defs = jobs_url(args.hub_url).removesuffix("/jobs") + "/definitions"
    method, url = {
        "submit": ("POST", defs if body and "schedule" in body else jobs_url(args.hub_url)),
        "schedules": ("GET", defs),
        "unschedule": ("DELETE", f"{defs}/{getattr(args, 'job_id', '')}"),
        "list": ("GET", jobs_url(args.hub_url)),
        "cancel": ("DELETE", jobs_url(args.hub_url, getattr(args, "job_id", ""))),
        "logs": ("GET", jobs_url(args.hub_url, getattr(args, "job_id", ""), "log")),
        "rerun": ("POST", jobs_url(args.hub_url, getattr(args, "job_id", ""), "rerun")),
        "output": ("GET", jobs_url(args.hub_url, getattr(args, "job_id", ""), "output")),
    }[c]
    try:
        r = requests.request(method, url, headers=headers, json=body, timeout=120)
    except requests.RequestException as e:
        print(f"workbench job: the hub at {args.hub_url} does not answer: {e}", file=sys.stderr)
        return 3
    if r.status_code >= 400:
        try:
            message = r.json().get("message", r.text)
        except ValueError:
            message = r.text[:300]
        print(f"workbench job {c}: {r.status_code}: {message}", file=sys.stderr)
        return 2 if r.status_code in (400, 403, 422) else 3
    if c == "schedules" or (c == "submit" and body and "schedule" in body):
        doc = r.json()
        for d in doc.get("definitions", [doc]):
            note = f"  last error: {d['last_error']}" if d["last_error"] else ""
            print(f"{d['id']}  {d['name']}  {d['schedule']} ({d['timezone']})  next {d['next_run']}{note}")
    elif c == "unschedule":
        print(f"schedule {args.job_id} deleted")
    elif c == "logs":
        sys.stdout.write(r.text)
    elif c == "output":
        out = args.output or r.headers.get("Content-Disposition", 'filename="output.ipynb"').split('"')[1]
        Path(out).write_bytes(r.content)
        print(f"wrote {out}")
    elif c == "cancel":
        j = r.json()
        print(f"job {j['id']}: {j['state']}")
    else:
        doc = r.json()
        print(format_jobs(doc["jobs"]))
        if c in ("submit", "rerun"):
            print(json.dumps([j["id"] for j in doc["jobs"]]))
    return 0
