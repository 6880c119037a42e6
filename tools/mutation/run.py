#!/usr/bin/env python3
"""Mutation testing of the reference server: does the conformance suite catch plausible bugs?

    python tools/mutation/run.py [--only ID ...] [--json FILE] [--timeout S] [--workers 1|2]
                                 [--no-baseline] [--check] [--list] [--keep] [-- PYTEST ARGS]

The mutants are data, hand-written in ``tools/mutation/mutants.toml``: a file
under ``reference_server/``, the exact text to replace (found exactly once,
or the tool stops: a mutant must not rot silently when the code moves), its
replacement, the bug it plants and the spec section that bug breaks.

The checkout is never edited.  The tool copies it to a temporary directory
and, one mutant at a time, writes the mutated file there, checks that the
mutated server still starts (``python -m reference_server`` from the copy
listens on a Unix socket), and runs

    nice -n 19 python -m pytest conformance --nbd-server=reference --nbd-strict -x -q \
        -p no:cacheprovider -n 2

with the copy as working directory and first on PYTHONPATH.  The reference
profile runs ``python -m reference_server`` from ``REPO_ROOT``, which
``conformance/servers/peers.py`` derives from its own ``__file__``: the
copy's suite therefore starts the copy's, mutated, server.  The tool checks
this before the first run.

Verdicts: **killed** (some check failed), **survived** (the suite passed),
A mutant's ``first`` checks (the files of the suite likely to kill it) run
before the whole suite: a failure there is a failure of the suite, found in
seconds rather than minutes; a mutant they do not kill is judged by the whole
suite.  ``--nbd-strict`` makes a SHOULD the suite sees broken a failure, as a MUST
is (the reference server passes the suite in strict mode).  ``-n 2`` is the
most this shared two-core machine takes; runs are sequential, never parallel.

**timeout** (the run overran ``--timeout``; counted as detected), **broken**
(the mutated server does not even start: not a real kill, counted apart).
A survivor whose mutant the spec allows, or which cannot be seen from the
wire, carries its reason in the table (``survives = "..."``).  The score is
(killed + timeout) / (mutants - broken).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE = Path(__file__).resolve().parent / "mutants.toml"
if str(REPO) not in sys.path:  # run as a script: the process harness lives in conformance/
    sys.path.insert(1, str(REPO))

from conformance.servers.peers import ServeOptions, reference_argv  # noqa: E402
from conformance.servers.process import (  # noqa: E402
    ServerProcess,
    ServerStartError,
    end_process_tree,
    stop_process,
    with_pythonpath,
)

# What the copy leaves out: history, environments, caches, build output.
IGNORED = shutil.ignore_patterns(
    ".git",
    ".tox",
    ".venv*",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "_build",
    "reports",
    "scratch",
    "*.egg-info",
)
START_TIMEOUT = 30.0
KILL_GRACE = 10.0
VERDICTS = ("killed", "survived", "timeout", "broken", "error")
FAILURE_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


class MutantRotted(ValueError):
    """A mutant's text is not found exactly once in its file: the table needs mending."""


@dataclass(frozen=True)
class Mutant:
    """One planted bug (an entry of mutants.toml)."""

    id: str
    file: str
    find: str
    replace: str
    bug: str
    spec: str
    survives: str = ""  # why a survivor is acceptable: equivalent, or allowed by the spec
    first: tuple[str, ...] = ()  # check files likely to kill it, run before the whole suite

    def apply(self, source: str) -> str:
        """SOURCE with the bug planted; MutantRotted unless ``find`` occurs exactly once."""
        count = source.count(self.find)
        if count != 1:
            raise MutantRotted(
                f"mutant {self.id}: the text to replace occurs {count} times in {self.file} "
                f"(expected exactly once):\n{self.find}"
            )
        return source.replace(self.find, self.replace)


def load_mutants(path: Path = TABLE) -> list[Mutant]:
    """The table, checked: unique IDs, every field present, files under reference_server/."""
    entries = tomllib.loads(path.read_text())["mutant"]
    mutants = [Mutant(**{**entry, "first": tuple(entry.get("first", ()))}) for entry in entries]
    seen: set[str] = set()
    for m in mutants:
        if m.id in seen:
            raise ValueError(f"mutant ID {m.id} appears twice in {path}")
        seen.add(m.id)
        if not m.file.startswith("reference_server/"):
            raise ValueError(f"mutant {m.id} mutates {m.file}, outside reference_server/")
        if not (m.bug.strip() and m.spec.strip()) or m.find == m.replace:
            raise ValueError(f"mutant {m.id}: bug, spec and a real change are required")
        for check in m.first:
            if not (REPO / check.split("::")[0]).is_file():
                raise ValueError(f"mutant {m.id}: first names {check}, which does not exist")
    return mutants


def mutated_source(mutant: Mutant, root: Path = REPO) -> str:
    """The mutated text of the mutant's file in ROOT; it must still parse as Python."""
    text = mutant.apply((root / mutant.file).read_text())
    try:
        ast.parse(text, mutant.file)
    except SyntaxError as exc:
        raise MutantRotted(f"mutant {mutant.id} does not parse: {exc}") from None
    return text


@dataclass
class Result:
    id: str
    verdict: str
    seconds: float
    detail: str  # the check that killed it, why it broke, or why a survivor is acceptable


# ------------------------------------------------------------------ the copy


@contextlib.contextmanager
def repository_copy(keep: bool) -> Iterator[Path]:
    """A throwaway copy of the checkout (sources only) to mutate."""
    parent = Path(tempfile.mkdtemp(prefix="nbd-mutation-"))
    copy = parent / "repo"
    shutil.copytree(REPO, copy, ignore=IGNORED, symlinks=True)
    try:
        yield copy
    finally:
        if keep:
            print(f"kept the copy in {copy}", file=sys.stderr)
        else:
            shutil.rmtree(parent, ignore_errors=True)


def copy_env(copy: Path) -> dict[str, str]:
    """The environment of a run in COPY: its sources first, no bytecode, asyncio debug off.

    Without PYTHONDONTWRITEBYTECODE a mutant the same size as the original,
    written in the same second, could be run from a stale .pyc.
    """
    env = with_pythonpath(copy)
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONASYNCIODEBUG="0")
    return {k: v for k, v in env.items() if not k.startswith("PYTEST_")}


def confirm_copy_is_run(copy: Path) -> None:
    """The suite in COPY starts COPY's server: its REPO_ROOT and reference_server are COPY's."""
    probe = (
        "import conformance.servers.peers as p, reference_server as r;"
        "print(p.REPO_ROOT); print(r.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=copy,
        env=copy_env(copy),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    root, server = Path(out[0]).resolve(), Path(out[1]).resolve()
    if root != copy.resolve() or not server.is_relative_to(copy.resolve()):
        raise SystemExit(
            f"mutation: the copy would not test itself (REPO_ROOT {root}, server {server})"
        )


def server_starts(copy: Path) -> str | None:
    """None if COPY's reference server listens; else why not (the mutant broke it)."""
    with tempfile.TemporaryDirectory(prefix="nbd-mutation-start-") as tmp:
        sock = Path(tmp) / "sock"
        argv = reference_argv(ServeOptions(socket=sock, memory="1M", export_name=""))
        server = ServerProcess(argv, log_path=Path(tmp) / "log", env=copy_env(copy), cwd=copy)
        try:
            server.wait_listening(sock, START_TIMEOUT)
        except ServerStartError as exc:
            return str(exc).strip().splitlines()[-1][:200]
        finally:
            stop_process(server.process)
    return None


# ------------------------------------------------------------------ the runs


def suite_argv(
    workers: int, extra: Sequence[str], suite: Sequence[str] = ("conformance",)
) -> list[str]:
    return [
        "nice",
        "-n",
        "19",
        sys.executable,
        "-m",
        "pytest",
        *suite,
        "--nbd-server=reference",
        "--nbd-strict",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        str(workers),
        *extra,
    ]


def run_suite(
    copy: Path, workers: int, timeout: float, extra: Sequence[str], suite: Sequence[str]
) -> Result:
    """One run of the suite in COPY, judged by its exit status and failures."""
    start = time.monotonic()
    process = subprocess.Popen(
        suite_argv(workers, extra, suite),
        cwd=copy,
        env=copy_env(copy),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: a timeout ends pytest, its workers, servers
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process_tree(process, KILL_GRACE)
        output, _ = process.communicate(timeout=KILL_GRACE)
        return Result("", "timeout", time.monotonic() - start, f"over {timeout:g} s")
    except BaseException:  # interrupted (SIGINT, or SIGTERM via main): leave nothing behind
        end_process_tree(process, KILL_GRACE)
        raise
    seconds = time.monotonic() - start
    failures = FAILURE_LINE.findall(output)
    if process.returncode == 0:
        return Result("", "survived", seconds, "")
    # 1: checks failed; 2: xdist's -x interrupts the session after the first failure.
    if process.returncode in (1, 2) and failures:
        return Result("", "killed", seconds, failures[0].split("::", 1)[-1])
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Result("", "error", seconds, f"pytest exit {process.returncode}: {tail[:300]}")


def run_mutant(
    mutant: Mutant,
    copy: Path,
    workers: int,
    timeout: float,
    extra: Sequence[str],
    suite: Sequence[str] = ("conformance",),
) -> Result:
    """Plant MUTANT in COPY, judge it, and restore the file whatever happens."""
    target = copy / mutant.file
    original = target.read_text()
    target.write_text(mutated_source(mutant, copy))
    try:
        start = time.monotonic()
        why = server_starts(copy)
        if why is not None:
            return Result(mutant.id, "broken", time.monotonic() - start, why)
        result = None
        if mutant.first and list(suite) == ["conformance"]:
            # Checks of the suite likely to kill it first: a kill there is a kill by the
            # suite, seconds instead of minutes; anything else is judged by the whole suite.
            result = run_suite(copy, workers, timeout, extra, mutant.first)
            if result.verdict not in ("killed", "timeout"):
                result = None
        if result is None:
            result = run_suite(copy, workers, timeout, extra, suite)
        result.id = mutant.id
        if result.verdict == "survived" and mutant.survives:
            result.detail = f"accepted: {mutant.survives}"
        return result
    finally:
        target.write_text(original)


# ------------------------------------------------------------------ reporting


def score_line(results: Sequence[Result]) -> str:
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    judged = len(results) - counts["broken"] - counts["error"]
    detected = counts["killed"] + counts["timeout"]
    accepted = sum(r.verdict == "survived" and r.detail.startswith("accepted") for r in results)
    score = f"{detected}/{judged} = {100 * detected / judged:.0f}%" if judged else "n/a"
    real = judged - accepted
    strict = f"{detected}/{real} = {100 * detected / real:.0f}%" if real else "n/a"
    parts = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return (
        f"{len(results)} mutants: {parts}.  Score (killed+timeout)/(N-broken): {score}; "
        f"excluding {accepted} accepted survivors: {strict}"
    )


def print_table(results: Sequence[Result]) -> None:
    width = max([len(r.id) for r in results] + [6])
    print(f"\n{'mutant':<{width}}  {'verdict':<8}  {'secs':>6}  detail")
    for r in results:
        print(f"{r.id:<{width}}  {r.verdict:<8}  {r.seconds:6.1f}  {r.detail}")
    print(score_line(results))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="ID", help="run this mutant (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run; default 600")
    p.add_argument("--workers", type=int, default=2, choices=(1, 2), help="pytest -n; default 2")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--check", action="store_true", help="only check that every mutant applies")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    p.add_argument(
        "--suite",
        action="append",
        metavar="PATH",
        help="run only these checks (e.g. conformance/test_errors.py::test_x) instead of the "
        "whole suite: a quick proof that a new check kills its mutant; scores use the whole suite",
    )
    p.add_argument("extra", nargs="*", help="more pytest arguments (after --)")
    args = p.parse_args(argv)
    # SIGTERM unwinds like ^C, so the run in progress is ended and the copy removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    mutants = load_mutants()
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            p.error(f"no mutant called {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.id in args.only]
    for m in mutants:  # every mutant applies before anything runs
        mutated_source(m)
    if args.list or args.check:
        for m in mutants:
            print(f"{m.id:<34} {m.file.removeprefix('reference_server/'):<28} {m.bug}")
        print(f"{len(mutants)} mutants, each applies exactly once")
        return 0

    suite = args.suite or ["conformance"]
    results: list[Result] = []
    started = time.monotonic()
    with repository_copy(args.keep) as copy:
        confirm_copy_is_run(copy)
        print(f"copy: {copy} (its suite starts its own server: checked)", flush=True)
        if not args.no_baseline and not args.only:
            base = run_suite(copy, args.workers, args.timeout, args.extra, suite)
            print(f"baseline (no mutant): {base.verdict} in {base.seconds:.0f} s", flush=True)
            if base.verdict != "survived":
                print(f"mutation: the unmutated suite does not pass: {base.detail}")
                return 2
        for i, m in enumerate(mutants, 1):
            r = run_mutant(m, copy, args.workers, args.timeout, args.extra, suite)
            results.append(r)
            print(f"[{i}/{len(mutants)}] {m.id}: {r.verdict} ({r.seconds:.0f} s) {r.detail}")
            sys.stdout.flush()
    print_table(results)
    print(f"wall time {time.monotonic() - started:.0f} s")
    if args.json:
        document = {
            "score": score_line(results),
            "results": [
                {**asdict(r), "bug": m.bug, "spec": m.spec, "file": m.file}
                for r, m in zip(results, mutants, strict=True)
            ],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(r.verdict == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
