"""The pytest plugin of the conformance suite: options, fixtures, verdicts, reports.

Options: ``--nbd-server=NAME`` (a built-in profile), ``--server-cmd
TEMPLATE``, ``--uri URI``, ``--allow-writes``, ``--strict`` (pytest's own
flag: SHOULD-level failures then fail; ``--nbd-strict`` does the same without
pytest's other strictness) and ``--report FILE.json``.

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

from conformance.report import NOT_RUN_PREFIX, Collector, render_table, section_table, to_json
from conformance.servers import PROFILES, Profile, ProfileCannotDo, Server, ServerConfig
from conformance.servers.command import CommandProfile
from conformance.servers.uri import UriProfile
from conformance.spec import MARKER, UNSUPPORTED_PREFIX, Level
from conformance.tlsutil import generate as generate_credentials

#: Seconds a single check may take before pytest-timeout ends it.
CHECK_TIMEOUT = 60

_collector_key = pytest.StashKey[Collector]()
_profile_key = pytest.StashKey[Profile]()


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
    config.stash[_profile_key] = _make_profile(config)
    workers = getattr(config.option, "numprocesses", None)
    if config.getoption("uri") and config.getoption("allow_writes") and workers:
        # Checks that write would then share one export at the same time.
        raise pytest.UsageError(
            "--uri with --allow-writes runs checks that write to one "
            "export: run them one at a time (without -n)"
        )
    config.stash[_collector_key] = Collector()


def profile_of(config: pytest.Config) -> Profile:
    return config.stash[_profile_key]


def _spec_marker(item: pytest.Item) -> pytest.Mark | None:
    return item.get_closest_marker(MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    profile = profile_of(config)
    deviations = {d.check: d for d in profile.deviations}
    writes_blocked = not profile.starts_servers and not config.getoption("allow_writes")
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
        if writes_blocked and item.get_closest_marker("writes") is not None:
            item.add_marker(
                pytest.mark.skip(
                    reason=NOT_RUN_PREFIX + "this check writes; pass --allow-writes to let it "
                    "write to a server the suite did not start"
                )
            )
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(CHECK_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
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
        "conformance.client.ServerTimeout: ",
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
    not_run = [r for r in results if r.outcome == "not-run"]
    if not_run:
        tr.write_sep(
            "=", f"checks not run: they write, and --allow-writes was not given ({len(not_run)})"
        )
        for r in sorted(not_run, key=lambda r: r.nodeid):
            tr.write_line(f"NOT RUN {r.id} [{r.section}]")
    tr.write_sep("=", f"NBD conformance: {describe_target(config, profile)}")
    # Full section paths are the point of the table: do not squeeze it to 80 columns.
    for line in render_table(section_table(results), width=max(tr._tw.fullwidth, 140)):
        tr.write_line(line)
    path = config.getoption("report")
    if path:
        text = to_json(
            results,
            profile=profile.name,
            target=describe_target(config, profile),
            strict=_strict(config),
            exitstatus=int(exitstatus),
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        tr.write_line(f"report written to {path}")


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
    nbd_profile: Profile, tls_credentials: Callable[[], str]
) -> Iterator[Callable[..., Server]]:
    """``start_server(ServerConfig(...)) -> Server``: a fresh server, stopped at teardown.

    Skips the check with the reason when the profile cannot be put in that
    configuration.
    """
    started: list[tuple[Server, Path | None]] = []

    def start(config: ServerConfig | None = None) -> Server:
        config = ServerConfig() if config is None else config
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
        started.append((server, workdir))
        return server

    yield start
    for server, workdir in reversed(started):
        server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


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
