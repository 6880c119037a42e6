"""The compatibility matrix as one self-contained HTML page.

No network access and no JavaScript needed to read it: the grid, the
legend, the per-server headers and every cell's detail (a ``<details>``
element: the spec sentence, the message, the evidence, the command that
reruns the check) are plain HTML with inline CSS.  A few lines of vanilla
JavaScript add the filters (failures only, one section, differences
between servers); they read and write the URL fragment, so a filtered
view is a link (``matrix.html#failures&section=3``), and a fragment part
naming a cell (``#c:qemu-nbd:test_y``, or ``#failures&c:qemu-nbd:test_y``)
opens its detail.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from conformance.matrix.merge import ABSENT, differs, family

#: Known verdicts, worst first: (outcome, label in the legend, glyph, colour).
VERDICTS: tuple[tuple[str, str, str, str], ...] = (
    ("failed", "failed", "\u2717", "#e0524c"),
    ("error", "error (setup or teardown)", "E", "#b8322c"),
    ("server-gone", "server gone", "\u2620", "#7a1d1a"),
    ("xpassed", "known deviation not seen", "\u2713?", "#f39c4a"),
    ("warning", "warning (SHOULD or MAY)", "!", "#f2d04b"),
    ("xfailed", "known deviation", "\u2248", "#b38bd6"),
    ("unsupported", "unsupported", "\u2013", "#8fb4dd"),
    ("not-run", "not run", "\u00b7", "#d9d9d9"),
    ("skipped", "skipped", "s", "#d9d9d9"),
    ("passed", "passed", "\u2713", "#6cc070"),
    (ABSENT, "absent from the report", " ", "#ffffff"),
)
#: The look of a verdict this page does not know (the suite's outcomes are an open set).
FALLBACK = ("?", "#ff66cc")
#: Verdicts the "failures only" filter keeps (plus any verdict not known here).
FAILURES = frozenset({"failed", "error", "server-gone", "xpassed", "warning", "xfailed"})
_KNOWN = {v[0]: v for v in VERDICTS}

#: The short tag a row carries for each set its check belongs to.
SET_TAGS = {"Baseline": "baseline", "Maximum interoperability": "max-interop"}
SET_LOOK = {"met": ("met", "#6cc070"), "not met": ("not met", "#e0524c")}


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _family(outcome: str) -> str | None:
    return family(outcome, _KNOWN)


def is_failure(outcome: str) -> bool:
    """Whether the "failures only" filter keeps OUTCOME (a verdict unknown here: yes)."""
    known = _family(outcome)
    return known is None or known in FAILURES


def css_class(outcome: str) -> str:
    known = _family(outcome)
    return f"o-{known}" if known else "o-other"


def label(outcome: str) -> str:
    """What a person reads for OUTCOME: the legend's words, plus the variant if any."""
    known = _family(outcome)
    if known is None:
        return outcome
    return _KNOWN[known][1] if known == outcome else f"{_KNOWN[known][1]} ({outcome})"


def cell_id(key: str, check_id: str) -> str:
    """The HTML id of a cell, a stable link target: ``c:SERVER:CHECK``."""
    return f"c:{key}:{''.join('_' if c.isspace() else c for c in check_id)}"


_CSS = """
body{font:14px/1.35 system-ui,sans-serif;margin:1em;color:#222}
h1{font-size:1.4em;margin:.2em 0}
table.grid{border-collapse:collapse}
.grid th,.grid td{border:1px solid #ccc;padding:2px 4px;vertical-align:top}
.grid thead th{position:sticky;top:0;background:#f4f4f4;z-index:1;text-align:left;
 font-weight:normal;max-width:9em;font-size:12px}
.grid thead th b{font-size:14px}
ul.servers{padding-left:1.2em}ul.servers li{margin-bottom:.4em}
.error{color:#b8322c;font-weight:bold}
.grid th.sec{background:#e8eef6;text-align:left;font-weight:bold}
.grid td.check{font-family:monospace;font-size:12px;max-width:34em;overflow-wrap:anywhere}
.lvl{white-space:nowrap;font:bold 10px sans-serif;padding:0 3px;border-radius:3px;background:#eee;
 margin-left:4px}
.tag{font:10px sans-serif;padding:0 3px;border:1px solid #999;border-radius:3px;margin-left:3px}
td.cell{min-width:5.5em;text-align:center;padding:0}
td.cell summary{cursor:pointer;list-style:none;padding:2px 4px;font-weight:bold}
td.cell summary::-webkit-details-marker{display:none}
td.cell details[open]{position:relative}
td.cell .detail{position:absolute;z-index:2;left:0;top:100%;width:40em;text-align:left;
 background:#fff;border:2px solid #555;padding:6px;box-shadow:2px 2px 6px #0005}
.detail pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0;background:#f6f6f6;
 padding:3px;font-size:12px}
.detail blockquote{margin:2px 0 4px 0;padding-left:6px;border-left:3px solid #8fb4dd}
.legend span.sw,.set{display:inline-block;padding:0 6px;margin:1px 4px 1px 0;border:1px solid #999}
.set{font-size:12px;border-radius:3px}
.counts{font-size:12px}
.mark{font-size:10px;padding:0 2px;border:1px solid #999;border-radius:3px;white-space:nowrap}
ul.reasons{font-size:12px;margin:.2em 0}
#filters{margin:.5em 0;padding:.4em;background:#f4f4f4;border:1px solid #ccc}
#filters label{margin-right:1em}
tr[hidden]{display:none}
"""

_JS = """
(function(){
var f=document.getElementById('filters');if(!f)return;f.hidden=false;
var fail=document.getElementById('f-failures'),diff=document.getElementById('f-differences'),
sec=document.getElementById('f-section'),status=document.getElementById('f-status');
function apply(){var n=0;
document.querySelectorAll('tbody.section').forEach(function(b){
var inSec=sec.value===''||b.dataset.section===sec.value,shown=0;
b.querySelectorAll('tr.row').forEach(function(r){
var ok=inSec&&(!fail.checked||r.dataset.failure==='1')&&(!diff.checked||r.dataset.differs==='1');
r.hidden=!ok;if(ok)shown++;});
b.hidden=shown===0;n+=shown;});
status.textContent=n+' checks shown';}
function toHash(){var p=[];if(fail.checked)p.push('failures');if(diff.checked)p.push('differences');
if(sec.value!=='')p.push('section='+sec.value);
history.replaceState(null,'',p.length?'#'+p.join('&'):location.pathname+location.search);apply();}
function fromHash(){var p=decodeURIComponent(location.hash.slice(1)).split('&');
fail.checked=p.indexOf('failures')>=0;diff.checked=p.indexOf('differences')>=0;sec.value='';
var open=null;p.forEach(function(x){if(x.indexOf('section=')===0)sec.value=x.slice(8);
if(x.indexOf('c:')===0)open=document.getElementById(x);});apply();
if(open){open.open=true;var r=open.getBoundingClientRect();
if(r.top<0||r.bottom>innerHeight)open.scrollIntoView({block:'center'});}}
[fail,diff,sec].forEach(function(x){x.addEventListener('change',toHash);});
window.addEventListener('hashchange',fromHash);fromHash();})();
"""


def _legend(outcomes: set[str]) -> str:
    items = [
        f'<span class="sw {css_class(o)}">{e(glyph)}</span>{e(label)}'
        for o, label, glyph, _ in VERDICTS
    ]
    for other in sorted(o for o in outcomes if _family(o) is None):
        items.append(f'<span class="sw o-other">{e(FALLBACK[0])}</span>{e(other)}')
    return '<p class="legend">Verdicts: ' + " ".join(items) + "</p>"


def _set_badge(name: str, score: Mapping[str, Any]) -> str:
    status = str(score.get("status", "undetermined"))
    label, colour = SET_LOOK.get(status, (status, "#d9d9d9"))
    reasons = "\n".join(score.get("reasons", []))
    title = f' title="{e(reasons)}"' if reasons else ""
    return (
        f'<span class="set" data-set="{e(name)}" data-status="{e(status)}" '
        f'style="background:{colour}"{title}>{e(name)}: {e(label)}</span>'
    )


def _set_mark(name: str, score: Mapping[str, Any]) -> str:
    """The set's verdict in a column header: its short tag, coloured."""
    status = str(score.get("status", "undetermined"))
    colour = SET_LOOK.get(status, (status, "#d9d9d9"))[1]
    return (
        f'<span class="mark" style="background:{colour}" title="{e(name)}: {e(status)}">'
        f"{e(SET_TAGS.get(name, name))}</span>"
    )


def _server_card(server: Mapping[str, Any]) -> str:
    """What the column header has no room for: version, configuration, totals, the sets."""
    counts = ", ".join(f"{n} {e(o)}" for o, n in server["counts"].items())
    total = sum(server["counts"].values())
    version = server.get("version") or "version unknown"
    sets = " ".join(_set_badge(name, score) for name, score in server["sets"].items())
    mode = "SHOULD failures fail" if server.get("strict") else "SHOULD failures are warnings"
    reasons = "".join(
        f"<li>{e(name)} {e(score['status'])}: {e(reason)}</li>"
        for name, score in server["sets"].items()
        if score.get("status") == "not met"
        for reason in score.get("reasons", [])
    )
    why = f'<ul class="reasons">{reasons}</ul>' if reasons else ""
    started = server.get("configuration")
    started_as = f"started as <code>{e(started)}</code><br>" if started else ""
    error = f'<br><span class="error">{e(server["error"])}</span>' if server.get("error") else ""
    return (
        f'<li class="server" data-server="{e(server["key"])}"><b>{e(server["key"])}</b> '
        f'<span class="version">{e(version)}</span>: <code>{e(server["target"])}</code> '
        f"({e(mode)}; exit status {e(server.get('exitstatus'))})<br>{started_as}"
        f'<span class="counts">{total} checks: {counts}</span><br>{sets}{why}{error}</li>'
    )


def _server_header(server: Mapping[str, Any]) -> str:
    version = server.get("version") or ""
    return (
        f'<th class="server" title="{e(server.get("configuration") or server["target"])}">'
        f"<b>{e(server['key'])}</b>"
        f'<br><span class="version">{e(version)}</span><br>'
        + " ".join(_set_mark(name, score) for name, score in server["sets"].items())
        + "</th>"
    )


def _cell(key: str, row: Mapping[str, Any]) -> str:
    cell = row["cells"][key]
    outcome = str(cell["outcome"])
    known = _family(outcome)
    glyph = _KNOWN[known][2] if known else FALLBACK[0]
    parts = [f"<b>{e(row['id'])}</b> on <b>{e(key)}</b>: {e(label(outcome))}"]
    if row.get("quote"):
        parts.append(f"<blockquote>{e(row['quote'])}</blockquote>")
    if cell.get("message"):
        parts.append(f'<div>Message:</div><pre class="message">{e(cell["message"])}</pre>')
    evidence = cell.get("evidence")
    if evidence:
        text = evidence if isinstance(evidence, str) else _evidence_text(evidence)
        parts.append(f'<div>Evidence:</div><pre class="evidence">{e(text)}</pre>')
    parts.append(f'<div>Rerun:</div><pre class="rerun">{e(cell["rerun"])}</pre>')
    return (
        f'<td class="cell {css_class(outcome)}">'
        f'<details id="{e(cell_id(key, row["id"]))}"><summary title="{e(outcome)}">'
        f'{e(glyph)}</summary><div class="detail">{"".join(parts)}</div></details></td>'
    )


def _evidence_text(evidence: object) -> str:
    if isinstance(evidence, list):
        return "\n".join(str(item) for item in evidence)
    if isinstance(evidence, dict):
        return "\n".join(f"{k}: {v}" for k, v in evidence.items())
    return str(evidence)


def _row(keys: Sequence[str], row: Mapping[str, Any]) -> str:
    failure = any(is_failure(str(row["cells"][k]["outcome"])) for k in keys)
    tags = "".join(
        f'<span class="tag" title="{e(s)}">{e(SET_TAGS.get(s, s))}</span>'
        for s in row.get("sets", [])
    )
    return (
        f'<tr class="row" data-failure="{int(failure)}" data-differs="{int(differs(row))}">'
        f'<td class="check" title="{e(row["nodeid"])}">{e(row["id"])}'
        f'<span class="lvl">{e(row["level"])}</span>{tags}</td>'
        + "".join(_cell(k, row) for k in keys)
        + "</tr>"
    )


def render(matrix: Mapping[str, Any], *, title: str = "NBD conformance matrix") -> str:
    """The whole page, from a document made by :func:`conformance.matrix.merge.merge`."""
    servers = matrix["servers"]
    keys = [s["key"] for s in servers]
    outcomes = {
        str(c["outcome"])
        for sec in matrix["sections"]
        for r in sec["checks"]
        for c in r["cells"].values()
    }
    colours = [f".o-{o}{{background:{colour}}}" for o, _, _, colour in VERDICTS]
    colours.append(f".o-other{{background:{FALLBACK[1]}}}")
    options = "".join(
        f'<option value="{i}">{e(sec["section"])} ({len(sec["checks"])})</option>'
        for i, sec in enumerate(matrix["sections"])
    )
    toc = " \u00b7 ".join(
        f'<a href="#s{i}">{e(sec["section"])}</a>' for i, sec in enumerate(matrix["sections"])
    )
    sets = "".join(
        f"<li><b>{e(s['name'])}</b> (&ldquo;{e(s['heading'])}&rdquo;): {e(s['preamble'])} "
        + "; ".join(e(f) for f in s["features"])
        + "</li>"
        for s in matrix.get("sets", [])
    )
    body = []
    for i, sec in enumerate(matrix["sections"]):
        body.append(
            f'<tbody class="section" data-section="{i}"><tr><th class="sec" id="s{i}" '
            f'colspan="{len(keys) + 1}">{e(sec["section"])}</th></tr>'
        )
        body.extend(_row(keys, row) for row in sec["checks"])
        body.append("</tbody>")
    total = sum(len(sec["checks"]) for sec in matrix["sections"])
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f'<meta name="viewport" content="width=device-width">'
        f"<style>{_CSS}{''.join(colours)}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        f"<p>{total} checks against {len(keys)} servers, grouped by the section of the NBD "
        "specification (<code>proto.md</code>) each enforces. Click a cell for the spec "
        "sentence, the message, the evidence and the command that reruns that check against "
        "that server (<code>nbd-conformance</code> is installed by <code>pip install .</code> in a "
        "checkout, and is in <code>.tox/matrix/bin/</code> after <code>tox -e matrix</code>).</p>"
        f"{_legend(outcomes)}"
        f'<details class="sets"><summary>The spec\'s own sets, scored per server</summary>'
        f"<ul>{sets}</ul><p>A set is met when every feature it lists was exercised by a "
        "check that passed and none of its checks failed (a known deviation counts as a "
        "failure); it is not met when one failed or all of a feature's checks were "
        "unsupported. Hover a badge for the reasons.</p></details>"
        f'<ul class="servers">{"".join(_server_card(s) for s in servers)}</ul>'
        f'<details class="toc"><summary>Sections ({len(matrix["sections"])})</summary>'
        f"<p>{toc}</p></details>"
        '<form id="filters" hidden><label><input type="checkbox" id="f-failures"> failures '
        'only (failed, warning, known deviation)</label><label><input type="checkbox" '
        'id="f-differences"> differences between servers</label><label>section '
        f'<select id="f-section"><option value="">all</option>{options}</select></label>'
        ' <output id="f-status"></output></form>'
        '<table class="grid"><thead><tr><th>check (level, sets)</th>'
        + "".join(_server_header(s) for s in servers)
        + "</tr></thead>"
        + "".join(body)
        + f"</table><script>{_JS}</script></body></html>\n"
    )
