"""Merge conformance reports (``--report`` JSON) into one matrix: servers x checks.

Pure functions over plain JSON values, so that the merge is unit-tested
without running the suite, and reports written by CI jobs on different
machines can be combined anywhere.  The merged document is what the HTML
page is rendered from, and is written beside it (``matrix.json``).

Outcomes are an open set: the suite may grow verdicts (``server-gone``,
``not-run`` with reasons) after this module was written; an outcome it does
not know is carried through as is and drawn with a fallback colour.
"""

from __future__ import annotations

import collections
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conformance.matrix import interop

FORMAT = "nbd-conformance-matrix/1"

#: The verdict of a check absent from one server's report (another suite version, a crashed run).
ABSENT = "absent"

#: The built-in profiles, in the order their columns appear (conformance/servers/__init__.py).
BUILT_IN = ("reference", "qemu-nbd", "nbdkit", "nbd-server")

#: Report keys that may carry the server's version (the first present wins).
VERSION_KEYS = ("version", "server_version")

#: Section of checks whose report has none.
NO_SECTION = "(no section)"

_KEYWORD_SAFE = re.compile(r"[\w:+\-.\[\]/]+")


def family(outcome: str, known: Iterable[str]) -> str | None:
    """The known verdict OUTCOME is, or is a variant of, or None.

    The suite may refine a verdict (``not-run: writes``, ``skipped (tls)``):
    a variant is the known name followed by anything not part of a name.
    """
    for name in sorted(known, key=len, reverse=True):
        if outcome == name or (outcome.startswith(name) and not outcome[len(name)].isalnum()):
            return name
    return None


class NotAReport(ValueError):
    """A file that is not a conformance report (no ``checks`` list)."""


def load_report(path: Path) -> dict[str, Any]:
    """Read one report; raise :class:`NotAReport` with the reason if it is not one."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise NotAReport(f"{path}: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("checks"), list):
        raise NotAReport(f"{path}: not a conformance report (no 'checks' list)")
    return document


def is_matrix(path: Path) -> bool:
    """Whether PATH holds a merged matrix (this module's output), not a report.

    ``reports/*.json`` matches the matrix written beside the reports too.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return f'"format": "{FORMAT}"'.encode() in head


def server_keys(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """A unique column key per report: the profile name, or the file stem when shared.

    Two reports of the same built-in profile (say from two machines) keep
    both columns, told apart by their file names.
    """
    profiles = [str(report.get("profile") or stem) for stem, report in reports]
    counts = collections.Counter(profiles)
    keys: list[str] = []
    for (stem, _), profile in zip(reports, profiles, strict=True):
        key = profile if counts[profile] == 1 and profile not in ("command", "uri") else stem
        base, n = key, 2
        while key in keys:
            key, n = f"{base}-{n}", n + 1
        keys.append(key)
    return keys


def column_order(
    reports: Sequence[tuple[str, Mapping[str, Any]]], known: Sequence[str]
) -> list[int]:
    """Indices of REPORTS with the KNOWN profiles first, in that order, then the rest as given.

    Reports assembled from a glob come in file-name order, which means
    nothing; the built-in servers always appear in the same order.
    """

    def rank(i: int) -> tuple[int, int]:
        profile = str(reports[i][1].get("profile", ""))
        return (known.index(profile) if profile in known else len(known), i)

    return sorted(range(len(reports)), key=rank)


def keyword_expression(check_id: str, all_ids: Iterable[str]) -> str | None:
    """A ``pytest -k`` expression selecting CHECK_ID alone among ALL_IDS, or None.

    ``-k`` matches substrings of the names of a check and of its module, so
    every other ID containing this one is excluded by name (no ID is a part
    of a module name: tests/test_matrix_docs.py checks).  None when the ID
    holds characters ``-k`` cannot take.
    """
    if not _KEYWORD_SAFE.fullmatch(check_id):
        return None
    others = sorted({i for i in all_ids if i != check_id and check_id in i})
    if any(not _KEYWORD_SAFE.fullmatch(o) for o in others):
        return None
    return " and ".join([check_id, *(f"not {o}" for o in others)])


def rerun_command(target: str, check_id: str, nodeid: str, all_ids: Iterable[str]) -> str:
    """The one command that reruns this check against this server.

    ``nbd-conformance`` always collects the whole suite, so the check is
    chosen with ``-k``; TARGET is the report's own description of the server
    (``--nbd-server=NAME``, ``--server-cmd '...'``, ``--uri URI``).
    """
    expression = keyword_expression(check_id, all_ids)
    if expression is None:
        return f"pytest {target} {shlex.quote(nodeid)}"
    return f"nbd-conformance {target} -k {shlex.quote(expression)}"


def _counts(outcomes: Iterable[str]) -> dict[str, int]:
    return dict(collections.Counter(outcomes).most_common())


def merge(
    reports: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge REPORTS ((file stem, report) pairs, in column order) into a matrix document.

    VERSIONS (column key -> version) fill in what a report does not say.
    Rows are ordered by section, then by node ID; a check missing from a
    report gets the verdict :data:`ABSENT` in that column.
    """
    versions = versions or {}
    keys = server_keys(reports)
    rows: dict[str, dict[str, Any]] = {}
    for key, (_, report) in zip(keys, reports, strict=True):
        for check in report["checks"]:
            if not isinstance(check, dict) or "nodeid" not in check:
                continue
            nodeid = str(check["nodeid"])
            row = rows.get(nodeid)
            if row is None:
                row = rows[nodeid] = {
                    "id": str(check.get("id") or nodeid.rsplit("::", 1)[-1]),
                    "nodeid": nodeid,
                    "section": str(check.get("section") or NO_SECTION),
                    "level": str(check.get("level") or "?"),
                    "quote": check.get("quote"),
                    "sets": interop.sets_of(nodeid),
                    "cells": {},
                }
            cell: dict[str, Any] = {
                "outcome": str(check.get("outcome") or "?"),
                "message": str(check.get("message") or ""),
            }
            if check.get("evidence"):
                cell["evidence"] = check["evidence"]
            row["cells"][key] = cell
    all_ids = [row["id"] for row in rows.values()]
    servers = []
    for key, (stem, report) in zip(keys, reports, strict=True):
        target = str(report.get("target") or f"--nbd-server={report.get('profile', key)}")
        # A strict run's warnings were failures: the rerun must be strict too.
        rerun_target = f"{target} --nbd-strict" if report.get("strict") else target
        outcomes: dict[str, str] = {}
        for row in rows.values():
            cell = row["cells"].setdefault(key, {"outcome": ABSENT, "message": ""})
            cell["rerun"] = rerun_command(rerun_target, row["id"], row["nodeid"], all_ids)
            outcomes[row["nodeid"]] = cell["outcome"]
        version = next((str(report[k]) for k in VERSION_KEYS if report.get(k)), None)
        servers.append(
            {
                "key": key,
                "profile": str(report.get("profile") or "?"),
                "target": target,
                "version": version or versions.get(key) or "",
                "configuration": str(report.get("configuration") or ""),
                "strict": bool(report.get("strict", False)),
                "exitstatus": report.get("exitstatus"),
                "source": stem,
                "error": str(report.get("error") or ""),
                "duration": report.get("duration"),
                "counts": _counts(outcomes.values()),
                "sets": {s.name: interop.score(s, outcomes).to_json() for s in interop.SETS},
            }
        )
    ordered = sorted(rows.values(), key=lambda r: (r["section"], r["nodeid"]))
    sections: list[dict[str, Any]] = []
    for row in ordered:
        if not sections or sections[-1]["section"] != row["section"]:
            sections.append({"section": row["section"], "checks": []})
        sections[-1]["checks"].append(row)
    return {
        "format": FORMAT,
        "servers": servers,
        "sets": [
            {
                "name": s.name,
                "heading": s.heading,
                "preamble": s.preamble,
                "features": [f.sentence for f in s.features],
            }
            for s in interop.SETS
        ],
        "sections": sections,
    }


def differs(row: Mapping[str, Any]) -> bool:
    """Whether the servers disagree on this check (one cell's verdict differs)."""
    return len({cell["outcome"] for cell in row["cells"].values()}) > 1


def to_json(matrix: Mapping[str, Any]) -> str:
    return json.dumps(matrix, indent=1) + "\n"
