"""``nbd-conformance matrix``: several servers' verdicts on one static page.

Either runs the suite against each target (built-in profiles, command
templates, URIs; by default every installed built-in server) or assembles
reports already written (``nbd-conformance matrix reports/*.json``), for
instance by CI jobs that ran on different machines; then writes the merged
JSON and one self-contained HTML page.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from conformance.matrix import merge, render, runner, screenshot

DESCRIPTION = """\
Run the conformance suite against several NBD servers (or take reports
already written) and write one self-contained HTML page of every check's
verdict per server, plus the merged JSON.  Without a target or a report,
runs every installed built-in server: reference, qemu-nbd, nbdkit, nbd-server.
Arguments after '--' go to every run (e.g. -- -k handshake).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nbd-conformance matrix",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "reports",
        nargs="*",
        type=Path,
        metavar="REPORT.json",
        help="reports to assemble (written by nbd-conformance --report)",
    )
    p.add_argument(
        "--nbd-server",
        action="append",
        default=[],
        metavar="PROFILE",
        choices=sorted(runner.PROFILES),
        help="run this built-in profile (repeatable)",
    )
    p.add_argument(
        "--server-cmd",
        action="append",
        default=[],
        metavar="TEMPLATE",
        help="run a server started from this template (repeatable)",
    )
    p.add_argument(
        "--uri",
        action="append",
        default=[],
        metavar="URI",
        help="run against this running server (repeatable; read-only checks only)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("reports"),
        help="where the runs write KEY.json and KEY.log (default: reports)",
    )
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        help="the page to write (default: OUT_DIR/matrix.html)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="the merged JSON to write (default: OUT_DIR/matrix.json)",
    )
    p.add_argument(
        "-n",
        "--numprocesses",
        default="auto",
        help="pytest-xdist workers per run (default: auto)",
    )
    p.add_argument("--title", default="NBD conformance matrix", help="the page's title")
    p.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also paint the page with headless chromium into FILE.png",
    )
    p.add_argument(
        "--screenshot-view",
        default="failures",
        metavar="FRAGMENT",
        help="the view to paint, as the page's URL fragment (default: failures)",
    )
    return p


def build(
    report_paths: list[Path], html_path: Path, json_path: Path, title: str
) -> tuple[int, float]:
    """Merge the reports and write the page and the JSON; (page bytes, seconds)."""
    started = time.monotonic()
    loaded = [(path.stem, merge.load_report(path)) for path in report_paths]
    reports = [loaded[i] for i in merge.column_order(loaded, list(merge.BUILT_IN))]
    matrix = merge.merge(reports)
    page = render.render(matrix, title=title).encode()
    html_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_bytes(page)
    json_path.write_text(merge.to_json(matrix))
    return len(page), time.monotonic() - started


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = parser().parse_args(argv)
    html_path = args.html or args.out_dir / "matrix.html"
    json_path = args.json or args.out_dir / "matrix.json"
    paths = [p for p in args.reports if not merge.is_matrix(p)]
    todo = runner.targets(args.nbd_server, args.server_cmd, args.uri)
    if not todo and not paths:
        todo = runner.targets(runner.installed_profiles(print), [], [])
    started = time.monotonic()
    if todo:
        results = runner.run_all(todo, args.out_dir, ["-n", str(args.numprocesses), *extra])
        paths += [r.report_path for r in results]
    try:
        size, seconds = build(paths, html_path, json_path, args.title)
    except merge.NotAReport as err:
        print(f"nbd-conformance matrix: {err}", file=sys.stderr)
        return 2
    print(
        f"matrix: {html_path} ({size} bytes, built from {len(paths)} reports in "
        f"{seconds:.2f} s; {time.monotonic() - started:.0f} s in all), {json_path}"
    )
    if args.screenshot:
        try:
            screenshot.take(html_path, args.screenshot, args.screenshot_view)
        except screenshot.NoChromium as err:
            print(f"nbd-conformance matrix: no screenshot: {err}", file=sys.stderr)
            return 3
        print(f"matrix: {args.screenshot} painted by chromium (#{args.screenshot_view})")
    return 0
