"""Posture report output: text for a terminal, Markdown and a self-contained HTML page for audits.
All of them render the JSON report (schema nodemesh.posture/v1), so every form says the same."""

from __future__ import annotations

import html
from typing import Any


def _source(r: dict[str, Any]) -> str:
    s = r["source"]
    return f"agent on node {s.get('node')}" if s["kind"] == "agent" else \
        f"mesh file {s.get('config')}"


def _summary(r: dict[str, Any]) -> str:
    parts = [f"{n} {sev}" for sev, n in r["summary"].items() if n]
    return ", ".join(parts) or "no findings"


def _rate_limits(r: dict[str, Any]) -> str:
    rl = r["rate_limits"]
    if not rl["supported"]:
        return "not supported by this agent version (none in force)"
    return "; ".join(str(x["summary"]) for x in rl["in_force"]) or "none configured"


def text(r: dict[str, Any]) -> str:
    inv = r["inventory"]
    lines = [f"nodemesh posture of {_source(r)} at {r['generated']}",
             f"{inv['workloads']} workloads ({inv['workloads_in_mesh']} in the mesh), "
             f"{inv['namespaces']} namespaces, {inv['authorization_policies']} authorization "
             f"policies, {inv['flows_examined']} flow records examined",
             f"findings: {_summary(r)}", ""]
    for f in r["findings"]:
        lines.append(f"[{f['severity'].upper()}] {f['title']}")
        lines.append(f"    {f['detail']}")
        lines.append(f"    fix: {f['fix']}")
    if r["certificates"]:
        lines += ["", "certificates:"]
        lines += [f"  {c['state']:<17} {c['kind']:<8} {c['subject']}  (not after "
                  f"{c['not_after']})" for c in r["certificates"]]
    lines += ["", f"rate limits: {_rate_limits(r)}"]
    return "\n".join(lines)


def _md(s: object) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(r: dict[str, Any]) -> str:
    inv = r["inventory"]
    out = ["# nodemesh posture report", "",
           f"- Source: {_md(_source(r))}", f"- Generated: {r['generated']}",
           f"- Inventory: {inv['workloads']} workloads ({inv['workloads_in_mesh']} in the mesh), "
           f"{inv['namespaces']} namespaces, {inv['authorization_policies']} authorization "
           f"policies, {inv['peer_authentications']} PeerAuthentications",
           f"- Flow records examined: {inv['flows_examined']}",
           f"- Findings: {_summary(r)}", "", "## Findings", ""]
    if r["findings"]:
        out += ["| Severity | Check | Subject | Finding | Fix |", "|---|---|---|---|---|"]
        out += [f"| {f['severity']} | {_md(f['check'])} | {_md(f['subject'])} | "
                f"{_md(f['title'])}: {_md(f['detail'])} | {_md(f['fix'])} |"
                for f in r["findings"]]
    else:
        out.append("None.")
    out += ["", "## Certificates", ""]
    if r["certificates"]:
        out += ["| State | Kind | Subject | Not after |", "|---|---|---|---|"]
        out += [f"| {c['state']} | {c['kind']} | {_md(c['subject'])} | {c['not_after']} |"
                for c in r["certificates"]]
    else:
        out.append("None examined.")
    out += ["", "## Rate limits", "", _rate_limits(r), ""]
    return "\n".join(out)


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1d2330}
table{border-collapse:collapse;width:100%;margin:1em 0}th,td{border:1px solid #ccd;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#eef}
.critical{background:#f8c9c9}.high{background:#fde2c8}.medium{background:#fdf3c8}
.low,.info{background:#eef5ee}"""


def html_page(r: dict[str, Any]) -> str:
    e = html.escape
    inv = r["inventory"]
    rows = "".join(
        f"<tr class='{e(f['severity'])}'><td>{e(f['severity'])}</td><td>{e(f['check'])}</td>"
        f"<td>{e(f['subject'])}</td><td><b>{e(f['title'])}</b><br>{e(f['detail'])}</td>"
        f"<td>{e(f['fix'])}</td></tr>" for f in r["findings"])
    certs = "".join(
        f"<tr><td>{e(c['state'])}</td><td>{e(c['kind'])}</td><td>{e(c['subject'])}</td>"
        f"<td>{e(c['not_after'])}</td></tr>" for c in r["certificates"])
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>nodemesh posture report</title><style>{_CSS}</style></head><body>"
        "<h1>nodemesh posture report</h1>"
        f"<p>Source: {e(_source(r))}<br>Generated: {e(r['generated'])}<br>"
        f"{inv['workloads']} workloads ({inv['workloads_in_mesh']} in the mesh), "
        f"{inv['namespaces']} namespaces, {inv['authorization_policies']} authorization "
        f"policies; {inv['flows_examined']} flow records examined<br>"
        f"Findings: {e(_summary(r))}</p><h2>Findings</h2>"
        + (f"<table><tr><th>Severity</th><th>Check</th><th>Subject</th><th>Finding</th>"
           f"<th>Fix</th></tr>{rows}</table>" if rows else "<p>None.</p>")
        + "<h2>Certificates</h2>"
        + (f"<table><tr><th>State</th><th>Kind</th><th>Subject</th><th>Not after</th></tr>"
           f"{certs}</table>" if certs else "<p>None examined.</p>")
        + f"<h2>Rate limits</h2><p>{e(_rate_limits(r))}</p></body></html>\n")
