"""The pytest plugin of the conformance suite: options, fixtures, verdicts, reports.

Options: ``--nbd-server=NAME`` (a built-in profile), ``--server-cmd
TEMPLATE``, ``--uri URI``, ``--allow-writes``, ``--allow-disruptive``,
``--strict`` (pytest's own flag: SHOULD-level failures then fail;
``--nbd-strict`` does the same without pytest's other strictness) and
``--report FILE.json``.

Safety toward a server the suite did not start (``--uri``): a check marked
``writes`` runs only with ``--allow-writes``, and every connection of every
check refuses to send a write unless the check is so marked and allowed
(:mod:`conformance.guard`); a check marked ``disruptive`` (it may crash,
wedge or stop the server) runs only with ``--allow-disruptive``; and after
every check the target is probed, so that a dead or wedged server ends the
run with the check that was running named, the rest reported as not run
(:mod:`conformance.liveness`).  A server the suite started that ends during
a check fails that check with how it ended and the tail of its log.

Verdicts: a MUST failure fails; a SHOULD (or MAY) failure becomes a
WARNING (a passed report carrying ``nbd_verdict=warning``) unless strict; a
feature the server does not offer is UNSUPPORTED (a skip with a prefix);
a known deviation of a built-in profile is an expected failure (strict
xfail with the reason and section).  The per-section table and the JSON
report are built from the reports that reach ``pytest_runtest_logreport``,
which under xdist runs on the controller, so ``-n auto`` works.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance import evidence
from conformance.guard import WritePermission
from conformance.liveness import GoneRecord, GoneState, ServerCrashed, TargetGone, probe
from conformance.report import (
    NOT_RUN_DISRUPTIVE,
    NOT_RUN_GONE,
    NOT_RUN_WRITES,
    Collector,
    not_run,
    not_run_counts,
    not_run_reason,
    render_table,
    section_table,
    to_json,
)
from conformance.requirements.coverage import coverage_lines
from conformance.servers import PROFILES, Profile, ProfileCannotDo, Server, ServerConfig
from conformance.servers.command import CommandProfile
from conformance.servers.uri import UriProfile
from conformance.spec import MARKER, UNSUPPORTED_PREFIX, Level
from conformance.tlsutil import generate as generate_credentials

#: Seconds a single check may take before pytest-timeout ends it.
CHECK_TIMEOUT = 60

_collector_key = pytest.StashKey[Collector]()
_profile_key = pytest.StashKey[Profile]()
_gone_key = pytest.StashKey[GoneState]()
#: Per check: the servers start_server started for it.
_servers_key = pytest.StashKey[list[Server]]()
#: Per check: whether it reached for the target (asked start_server for it).
_touched_key = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nbd", "NBD conformance suite")
    group.addoption(
        "--nbd-server",
        default="reference",
        choices=sorted(PROFILES),
        help="built-in server profile to test (default: reference)",
    )
    group.addoption(
        "--server-cmd",
        default=None,
        metavar="TEMPLATE",
        help="test another server, started per check from TEMPLATE with "
        "placeholders {socket} {size} {export} {description} {shared} "
        "{tls_dir} {read_only:WORD} {tls:WORD}",
    )
    group.addoption(
        "--uri",
        default=None,
        metavar="URI",
        help="test a server that is already running (nbd://, nbds://, nbd+unix://, nbds+unix://)",
    )
    group.addoption(
        "--allow-writes",
        action="store_true",
        default=False,
        help="with --uri, let checks write to the export (destroys its data)",
    )
    group.addoption(
        "--allow-disruptive",
        action="store_true",
        default=False,
        help="with --uri, run checks that may crash, wedge or stop the server "
        "(fuzzing, CVE reproducers, hostile sizes, stalled clients, shutdown)",
    )
    group.addoption(
        "--nbd-strict",
        action="store_true",
        default=False,
        help="SHOULD-level failures fail (as does pytest's --strict)",
    )
    group.addoption(
        "--report",
        default=None,
        metavar="FILE.json",
        help="write every check's verdict as JSON to FILE.json",
    )


def _strict(config: pytest.Config) -> bool:
    return bool(config.getoption("nbd_strict") or getattr(config.option, "strict", False))


def _make_profile(config: pytest.Config) -> Profile:
    uri = config.getoption("uri")
    command = config.getoption("server_cmd")
    if uri and command:
        raise pytest.UsageError("--uri and --server-cmd are exclusive")
    try:
        if uri:
            return UriProfile(uri, config.getoption("allow_writes"))
        if command:
            return CommandProfile(command)
    except ValueError as err:
        raise pytest.UsageError(str(err)) from err
    return PROFILES[config.getoption("nbd_server")]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(section, level, quote): the spec section a check enforces"
    )
    config.addinivalue_line(
        "markers", "writes: the check writes to the export (needs --allow-writes with --uri)"
    )
    config.addinivalue_line(
        "markers",
        "disruptive: the check may crash, wedge or stop the server "
        "(needs --allow-disruptive with --uri)",
    )
    config.stash[_profile_key] = _make_profile(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        gone_path = Path(workerinput["nbd_gone_state"])
    else:
        gone_path = _short_tmpdir("nbd-run-") / "target-gone.json"
    config.stash[_gone_key] = GoneState(gone_path)
    workers = getattr(config.option, "numprocesses", None)
    if config.getoption("uri") and config.getoption("allow_writes") and workers:
        # Checks that write would then share one export at the same time.
        raise pytest.UsageError(
            "--uri with --allow-writes runs checks that write to one "
            "export: run them one at a time (without -n)"
        )
    config.stash[_collector_key] = Collector()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist, on the controller: every worker shares the record of a gone target."""
    node.workerinput["nbd_gone_state"] = str(node.config.stash[_gone_key].path)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _gone_key in config.stash:
        shutil.rmtree(config.stash[_gone_key].path.parent, ignore_errors=True)


def profile_of(config: pytest.Config) -> Profile:
    return config.stash[_profile_key]


def _writes_allowed(config: pytest.Config) -> bool:
    """Whether the target may be written at all (the check's marker aside)."""
    return profile_of(config).starts_servers or bool(config.getoption("allow_writes"))


def _disruption_allowed(config: pytest.Config) -> bool:
    return profile_of(config).starts_servers or bool(config.getoption("allow_disruptive"))


def _spec_marker(item: pytest.Item) -> pytest.Mark | None:
    return item.get_closest_marker(MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    profile = profile_of(config)
    deviations = {d.check: d for d in profile.deviations}
    writes_blocked = not _writes_allowed(config)
    disruption_blocked = not _disruption_allowed(config)
    for item in items:
        mark = _spec_marker(item)
        check_id = item.name
        item.user_properties.append(("nbd_check", check_id))
        if mark is not None:
            item.user_properties.append(("nbd_section", mark.kwargs["section"]))
            item.user_properties.append(("nbd_level", str(mark.kwargs["level"])))
            if mark.kwargs.get("quote"):
                item.user_properties.append(("nbd_quote", mark.kwargs["quote"]))
        original = getattr(item, "originalname", item.name)
        deviation = deviations.get(item.name) or deviations.get(original)
        if deviation is not None:
            item.add_marker(
                pytest.mark.xfail(
                    reason=f"known {profile.name} deviation [{deviation.section}]: "
                    f"{deviation.reason}",
                    strict=not deviation.intermittent,
                )
            )
        if disruption_blocked and item.get_closest_marker("disruptive") is not None:
            item.add_marker(
                pytest.mark.skip(
                    reason=not_run(
                        NOT_RUN_DISRUPTIVE,
                        "this check may crash, wedge or stop the server; pass "
                        "--allow-disruptive to run it against a server the suite did not start",
                    )
                )
            )
        elif writes_blocked and item.get_closest_marker("writes") is not None:
            item.add_marker(
                pytest.mark.skip(
                    reason=not_run(
                        NOT_RUN_WRITES,
                        "this check writes; pass --allow-writes to let it write to a "
                        "server the suite did not start",
                    )
                )
            )
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(CHECK_TIMEOUT))


# --------------------------------------------------- a target that dies or wedges


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A gone target: the check is not run (a plain hook, so every wrapper still runs)."""
    evidence.begin()
    if item.get_closest_marker("skip") is not None:
        return  # not run for its own reason (it writes, it is disruptive...)
    if profile_of(item.config).running_server() is not None:
        gone = item.config.stash[_gone_key].read()
        if gone is not None:
            pytest.skip(not_run(NOT_RUN_GONE, gone.describe()))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """A server started for this check that ended during it fails the check, whatever it said."""
    try:
        return (yield)
    finally:
        _raise_if_a_server_ended(item)


def _raise_if_a_server_ended(item: pytest.Item) -> None:
    for server in item.stash.get(_servers_key, []):
        how = server.unexpected_exit()
        if how is not None:
            server.expect_exit()  # reported once, here
            raise ServerCrashed(how)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """After the check's own teardown: is the target the suite did not start still there?"""
    try:
        result = yield
        _probe_after(item)
    finally:
        evidence.end()
    return result


def _probe_after(item: pytest.Item) -> None:
    running = profile_of(item.config).running_server()
    if running is None or not item.stash.get(_touched_key, False):
        return
    state = item.config.stash[_gone_key]
    if state.read() is not None:
        return
    reason = probe(running)
    if reason is None:
        return
    workerinput = getattr(item.config, "workerinput", None)
    worker = "" if workerinput is None else str(workerinput.get("workerid", ""))
    gone = state.record(GoneRecord(check=item.nodeid, reason=reason, worker=worker))
    raise TargetGone(f"{gone.describe()}; the remaining checks are not run")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    _attach_evidence(item, report)
    if (
        report.when == "call"
        and report.failed
        and call.excinfo is not None
        and call.excinfo.errisinstance(AssertionError)
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("xfail") is None
        and not _strict(item.config)
    ):
        mark = _spec_marker(item)
        if mark is not None and mark.kwargs["level"] in (Level.SHOULD, Level.MAY):
            message = _clean(call.excinfo.exconly())
            report.outcome = "passed"
            report.longrepr = None
            report.user_properties.append(("nbd_verdict", "warning"))
            report.user_properties.append(("nbd_message", f"{mark.kwargs['level']}: {message}"))
    return report


def _attach_evidence(item: pytest.Item, report: pytest.TestReport) -> None:
    """A failing check (a warning is a SHOULD failure) or a known deviation carries
    what went over the wire.

    Attached before a SHOULD failure becomes a warning (below), and to the item
    as well as to this report, so that the teardown report, the one pytest's
    JUnit writer reads, carries it too.
    """
    transcript = evidence.current()
    if transcript is None or not transcript.total:
        return
    if not (report.failed or (report.skipped and hasattr(report, "wasxfail"))):
        return
    if any(name == "nbd_evidence" for name, _ in item.user_properties):
        return
    entry = ("nbd_evidence", transcript.text())
    item.user_properties.append(entry)
    report.user_properties.append(entry)


def _properties(report: pytest.TestReport) -> dict[str, Any]:
    return {key: value for key, value in report.user_properties}


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    if (
        report.when == "call"
        and report.passed
        and _properties(report).get("nbd_verdict") == "warning"
    ):
        return "warning", "W", ("WARNING", {"yellow": True})
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: ") :]
        if reason.startswith(UNSUPPORTED_PREFIX):
            return "unsupported", "U", ("UNSUPPORTED", {"blue": True})
    return None


def _clean(message: str) -> str:
    """The verdict text without the exception class of the suite's own verifiers."""
    for prefix in (
        "conformance.spec.SpecViolation: ",
        "conformance.handle.ServerTimeout: ",
        "conformance.liveness.ServerCrashed: ",
        "conformance.liveness.TargetGone: ",
        "AssertionError: ",
    ):
        message = message.removeprefix(prefix)
    return message


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        return reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return _clean(str(crash.message))
        return str(report.longrepr)[-2000:]
    return ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Under xdist this runs on the controller (fed with the workers' reports)
    # as well as on each worker; only the controller aggregates.
    config = _CONFIG.get("config")
    if config is None or hasattr(config, "workerinput"):
        return
    config.stash[_collector_key].add(
        nodeid=report.nodeid,
        when=report.when,
        outcome=report.outcome,
        properties=_properties(report),
        message=_message(report),
        wasxfail=getattr(report, "wasxfail", None),
        duration=report.duration,
    )


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    collector = config.stash[_collector_key]
    results = list(collector.results.values())
    if not results:
        return
    profile = profile_of(config)
    tr = terminalreporter
    warnings = [r for r in results if r.outcome == "warning"]
    if warnings:
        tr.write_sep(
            "=", f"SHOULD-level warnings ({len(warnings)}; --strict makes them fail)", yellow=True
        )
        for r in sorted(warnings, key=lambda r: r.nodeid):
            tr.write_line(f"WARNING {r.id} [{r.section}]: {r.message}")
    left_out = [r for r in results if r.outcome == "not-run"]
    if left_out:
        tr.write_sep("=", f"checks not run ({len(left_out)})")
        for r in sorted(left_out, key=lambda r: r.nodeid):
            tr.write_line(f"NOT RUN {r.id} [{r.section}]: {not_run_reason(r.message)}")
    gone = config.stash[_gone_key].read() if profile.running_server() is not None else None
    if gone is not None:
        tr.write_sep("=", "THE SERVER UNDER TEST IS GONE", red=True, bold=True)
        tr.write_line(gone.describe(), red=True)
    reappeared = [r for r in results if r.outcome == "xpassed"]
    if reappeared:
        tr.write_sep("=", f"intermittent known deviations not seen this run ({len(reappeared)})")
        for r in sorted(reappeared, key=lambda r: r.nodeid):
            tr.write_line(f"PASSED {r.id} [{r.section}]: {r.message}")
    tr.write_sep("=", f"NBD conformance: {describe_target(config, profile)}")
    # Full section paths are the point of the table: do not squeeze it to 80 columns.
    for line in render_table(section_table(results), width=max(tr._tw.fullwidth, 140)):
        tr.write_line(line)
    for line in _not_run_lines(not_run_counts(results)):
        tr.write_line(line)
    # What the suite as a whole can say (the requirement ledger, docs/traceability).
    for line in coverage_lines():
        tr.write_line(line)
    path = config.getoption("report")
    if path:
        text = to_json(
            results,
            profile=profile.name,
            target=describe_target(config, profile),
            strict=_strict(config),
            exitstatus=int(exitstatus),
            target_gone=None if gone is None else gone.describe(),
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        tr.write_line(f"report written to {path}")


#: What lifts each reason a check is not run.
_NOT_RUN_HELP = {
    NOT_RUN_WRITES: "they write to the export: --allow-writes lets them",
    NOT_RUN_DISRUPTIVE: "they may crash, wedge or stop the server: --allow-disruptive lets them",
    NOT_RUN_GONE: "the server stopped answering before their turn",
}


def _not_run_lines(counts: dict[str, int]) -> list[str]:
    return [
        f"not run: {count} ({_NOT_RUN_HELP.get(reason, reason)})"
        for reason, count in sorted(counts.items())
    ]


def describe_target(config: pytest.Config, profile: Profile) -> str:
    if isinstance(profile, UriProfile):
        return f"--uri {profile.uri}"
    if isinstance(profile, CommandProfile):
        return f"--server-cmd {profile.template!r}"
    return f"--nbd-server={profile.name}"


# --------------------------------------------------------------------------- fixtures


def _short_tmpdir(prefix: str) -> Path:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep.
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR", "/tmp")))


@pytest.fixture(scope="session")
def nbd_profile(pytestconfig: pytest.Config) -> Profile:
    """The profile of the server under test."""
    return profile_of(pytestconfig)


@pytest.fixture(scope="session")
def tls_credentials() -> Iterator[Callable[[], str]]:
    """A callable returning a directory of TLS credentials, made on first use."""
    made: list[Path] = []

    def get() -> str:
        if not made:
            made.append(generate_credentials(_short_tmpdir("nbd-tls-")).directory)
        return str(made[0])

    yield get
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(
    request: pytest.FixtureRequest, nbd_profile: Profile, tls_credentials: Callable[[], str]
) -> Iterator[Callable[..., Server]]:
    """``start_server(ServerConfig(...)) -> Server``: a fresh server, stopped at teardown.

    Skips the check with the reason when the profile cannot be put in that
    configuration.  Every connection to the server carries the check's write
    permission; a server that ends during the check fails it.
    """
    started: list[tuple[Server, Path | None]] = []
    permission = WritePermission(
        marked=request.node.get_closest_marker("writes") is not None,
        target_writable=_writes_allowed(request.config),
        check=request.node.nodeid,
    )
    servers = request.node.stash.setdefault(_servers_key, [])

    def start(config: ServerConfig | None = None) -> Server:
        config = ServerConfig() if config is None else config
        request.node.stash[_touched_key] = True  # probe the target after this check
        try:
            if config.minimum_block_size != 1 and not nbd_profile.sets_minimum_block_size:
                raise ProfileCannotDo("no way to set a minimum block size")
            nbd_profile.check_config(config)
        except ProfileCannotDo as err:
            pytest.skip(f"{nbd_profile.name} cannot be configured with {config.describe()}: {err}")
        tls_dir = tls_credentials() if config.tls and nbd_profile.starts_servers else None
        workdir = _short_tmpdir("nbd-") if nbd_profile.starts_servers else None
        try:
            server = nbd_profile.start(config, workdir or Path("."), tls_dir)
        except BaseException:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        server.write_permission = permission
        started.append((server, workdir))
        servers.append(server)
        return server

    yield start
    ended = [how for server, _ in started if (how := server.unexpected_exit()) is not None]
    for server, workdir in reversed(started):
        server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if ended:
        raise ServerCrashed(ended[0])


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    """A fresh writable server allowing several connections."""
    return start_server(ServerConfig())


@pytest.fixture
def ro_server(start_server: Callable[..., Server]) -> Server:
    """A fresh read-only server."""
    return start_server(ServerConfig(read_only=True))


@pytest.fixture
def nbd_handle(server: Server) -> Any:
    """One libnbd handle connected to ``server``."""
    return server.connect()
