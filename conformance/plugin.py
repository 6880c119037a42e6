"""The pytest plugin of the conformance suite: options, verdicts, safety, reports.

Options: ``--nbd-server=NAME`` (a built-in or registered profile),
``--server-cmd TEMPLATE``, ``--uri URI``, ``--allow-writes``,
``--allow-disruptive``, ``--strict`` (pytest's own flag: SHOULD-level failures
then fail; ``--nbd-strict`` does the same without pytest's other strictness),
``--wide-context NAME`` and ``--report FILE.json``.

The module registers the options and, at configure time, one
:class:`ConformancePlugin`: the object that holds the run's state (the
profile, the verdicts collected, the record of a gone target) and implements
the hooks.  Fixtures live in :mod:`conformance.fixtures`; another project can
add server profiles through :mod:`conformance.hookspecs`.

Verdicts (:mod:`conformance.verdict`) are decided once per phase report, where
the check ran: a MUST failure fails; a SHOULD (or MAY) assertion failure is a
WARNING unless strict; :class:`~conformance.verdict.Unsupported` and
:class:`~conformance.verdict.NotRun` end a check without judging the server;
a known deviation of the profile is an expected failure (strict xfail, or not
strict when recorded as intermittent).  The per-section table and the JSON
report are built from the reports that reach ``pytest_runtest_logreport`` on
the controller, so ``-n auto`` works.

Safety toward a server the suite did not start (``--uri``): a check marked
``writes`` runs only with ``--allow-writes``, and every connection of every
check refuses to send a write unless the check is so marked and allowed
(:mod:`conformance.guard`); a check marked ``disruptive`` runs only with
``--allow-disruptive``; after every check the target is probed, so that a
dead or wedged server ends the run with the check that was running named and
the rest not run (:mod:`conformance.liveness`).  A server the suite started
that ends during a check fails that check with how it ended and its log.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from conformance import evidence, fixtures
from conformance.fixtures import RUN, SERVERS, TOUCHED, short_tmpdir
from conformance.liveness import GoneRecord, GoneState, ServerCrashed, TargetGone, probe
from conformance.report import Collector, to_json
from conformance.requirements.coverage import coverage_lines
from conformance.servers import PROFILES, Profile
from conformance.servers.command import CommandProfile
from conformance.servers.uri import UriProfile
from conformance.spec import MARKER, Level
from conformance.verdict import NotRun, NotRunReason, Verdict, decide

#: Seconds a single check may take before pytest-timeout ends it.
CHECK_TIMEOUT = 60
#: Seconds a failed check waits for its server to finish dying (a crash being dumped).
CRASH_GRACE = 3.0
#: The name the plugin object is registered under.
PLUGIN_NAME = "nbd-conformance"

#: Per check: why the suite will not run it, decided at collection.
_NOT_RUN = pytest.StashKey[tuple[NotRunReason, str]]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from conformance import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nbd", "NBD conformance suite")
    group.addoption(
        "--nbd-server",
        default="reference",
        metavar="PROFILE",
        help=f"server profile to test: {', '.join(sorted(PROFILES))} or one a "
        "plugin registers (default: reference)",
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
        "--wide-context",
        default=None,
        metavar="NAME",
        help="a metadata context the server offers whose status needs 64 bits "
        "(EXTENDED_HEADERS extension), for the checks of test_wide_contexts.py "
        "(default: the profile's; the reference server's is x-reference:next-data)",
    )
    group.addoption(
        "--report",
        default=None,
        metavar="FILE.json",
        help="write every check's verdict as JSON to FILE.json",
    )


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
    config.pluginmanager.register(ConformancePlugin(config), PLUGIN_NAME)
    if not config.pluginmanager.is_registered(fixtures):
        config.pluginmanager.register(fixtures, f"{PLUGIN_NAME}-fixtures")


def plugin_of(config: pytest.Config) -> ConformancePlugin:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    assert isinstance(plugin, ConformancePlugin), "conformance.plugin is not loaded"
    return plugin


def make_profile(config: pytest.Config) -> Profile:
    """The profile the options name: --uri, --server-cmd or --nbd-server."""
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
    profiles: dict[str, type[Profile]] = dict(PROFILES)
    for registered in config.hook.pytest_nbd_profiles():
        profiles.update({profile.name: profile for profile in registered})
    name = config.getoption("nbd_server")
    if name not in profiles:
        raise pytest.UsageError(
            f"--nbd-server={name}: no such profile (known: {', '.join(sorted(profiles))})"
        )
    return profiles[name]()


def describe_target(profile: Profile) -> str:
    if isinstance(profile, UriProfile):
        return f"--uri {profile.uri}"
    if isinstance(profile, CommandProfile):
        return f"--server-cmd {profile.template!r}"
    return f"--nbd-server={profile.name}"


class ConformancePlugin:
    """The state of one run and the hooks that use it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.profile = make_profile(config)
        #: The server that runs for the whole session (--uri), probed after each check.
        self.running = self.profile.running_server()
        self.strict = bool(
            config.getoption("nbd_strict") or getattr(config.option, "strict", False)
        )
        self.writes_allowed = self.profile.starts_servers or bool(config.getoption("allow_writes"))
        self.disruption_allowed = self.profile.starts_servers or bool(
            config.getoption("allow_disruptive")
        )
        #: A metadata context with 64-bit status the server offers, or None.
        self.wide_context: str | None = (
            config.getoption("wide_context") or self.profile.wide_context
        )
        self.collector = Collector()
        config.stash[RUN] = self
        self.is_worker = hasattr(config, "workerinput")
        workerinput = getattr(config, "workerinput", None)
        if workerinput is not None:
            gone_path = Path(workerinput["nbd_gone_state"])
        else:
            gone_path = short_tmpdir("nbd-run-") / "target-gone.json"
        self.gone = GoneState(gone_path)
        workers = getattr(config.option, "numprocesses", None)
        if config.getoption("uri") and config.getoption("allow_writes") and workers:
            # Checks that write would then share one export at the same time.
            raise pytest.UsageError(
                "--uri with --allow-writes runs checks that write to one "
                "export: run them one at a time (without -n)"
            )

    # ------------------------------------------------------------ lifecycle

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist, on the controller: every worker shares the record of a gone target."""
        node.workerinput["nbd_gone_state"] = str(self.gone.path)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.profile.close()
        if not self.is_worker:
            shutil.rmtree(self.gone.path.parent, ignore_errors=True)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        deviations = {d.check: d for d in self.profile.deviations}
        for item in items:
            mark = item.get_closest_marker(MARKER)
            item.user_properties.append(("nbd_check", item.name))
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
                        reason=f"known {self.profile.name} deviation [{deviation.section}]: "
                        f"{deviation.reason}",
                        strict=not deviation.intermittent,
                    )
                )
            if not self.disruption_allowed and item.get_closest_marker("disruptive"):
                item.stash[_NOT_RUN] = (
                    NotRunReason.DISRUPTIVE,
                    "this check may crash, wedge or stop the server; pass "
                    "--allow-disruptive to run it against a server the suite did not start",
                )
            elif not self.writes_allowed and item.get_closest_marker("writes"):
                item.stash[_NOT_RUN] = (
                    NotRunReason.WRITES,
                    "this check writes; pass --allow-writes to let it write to a "
                    "server the suite did not start",
                )
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(CHECK_TIMEOUT))

    # -------------------------------------------------- running one check

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Not run, or a gone target: the check ends here (a plain hook: wrappers still run)."""
        evidence.begin()
        if _NOT_RUN in item.stash:
            raise NotRun(*item.stash[_NOT_RUN])
        if self.running is not None:
            gone = self.gone.read()
            if gone is not None:
                raise NotRun(NotRunReason.GONE, gone.describe())

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        """A server started for this check that ended during it fails the check."""
        failed = True
        try:
            result = yield
            failed = False
            return result
        finally:
            for server in item.stash.get(SERVERS, []):
                how = server.unexpected_exit(grace=CRASH_GRACE if failed else 0.0)
                if how is not None:
                    server.expect_exit()  # reported once, here
                    raise ServerCrashed(how)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Any:
        """After the check's own teardown: is a target the suite did not start still there?"""
        try:
            result = yield
            self._probe_after(item)
        finally:
            evidence.end()
        return result

    def _probe_after(self, item: pytest.Item) -> None:
        if self.running is None or not item.stash.get(TOUCHED, False):
            return
        if self.gone.read() is not None:
            return
        reason = probe(self.running)
        if reason is None:
            return
        workerinput = getattr(self.config, "workerinput", None)
        worker = "" if workerinput is None else str(workerinput.get("workerid", ""))
        gone = self.gone.record(GoneRecord(check=item.nodeid, reason=reason, worker=worker))
        raise TargetGone(f"{gone.describe()}; the remaining checks are not run")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Decide the phase's verdict once, here, and attach it (and the evidence) to the report."""
        report: pytest.TestReport = yield
        exception = call.excinfo.value if call.excinfo is not None else None
        mark = item.get_closest_marker(MARKER)
        verdict = decide(
            when=report.when,
            outcome=report.outcome,
            wasxfail=getattr(report, "wasxfail", None),
            exception=exception,
            should_level=mark is not None and mark.kwargs["level"] in (Level.SHOULD, Level.MAY),
            strict=self.strict,
        )
        if verdict in (Verdict.FAILED, Verdict.ERROR, Verdict.WARNING, Verdict.KNOWN):
            _attach_evidence(item, report)
        message = _message(report, exception, verdict)
        if verdict == Verdict.WARNING:
            assert mark is not None
            message = f"{mark.kwargs['level']}: {message}"
            report.outcome = "passed"
            report.longrepr = None
        report.nbd_verdict = verdict.value  # type: ignore[attr-defined]
        report.nbd_message = message  # type: ignore[attr-defined]
        reason = exception.reason.value if isinstance(exception, NotRun) else None
        report.nbd_reason = reason  # type: ignore[attr-defined]
        return report

    def pytest_report_teststatus(self, report: pytest.TestReport) -> Any:
        verdict = getattr(report, "nbd_verdict", None)
        if verdict == Verdict.WARNING.value:
            return "warning", "W", ("WARNING", {"yellow": True})
        if verdict == Verdict.UNSUPPORTED.value:
            return "unsupported", "U", ("UNSUPPORTED", {"blue": True})
        if verdict == Verdict.NOT_RUN.value:
            return "not run", "n", ("NOT RUN", {"blue": True})
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Under xdist this runs on the controller (fed with the workers'
        # reports) as well as on each worker; only the controller aggregates.
        if self.is_worker or not hasattr(report, "nbd_verdict"):
            return
        self.collector.add(
            nodeid=report.nodeid,
            when=report.when,
            verdict=Verdict(report.nbd_verdict),
            properties=dict(report.user_properties),
            message=report.nbd_message,
            reason=report.nbd_reason,
            duration=report.duration,
        )

    # ------------------------------------------------------------ the end

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        if self.is_worker:
            return
        from conformance.summary import write_summary

        results = list(self.collector.results.values())
        if not results:
            return
        gone = self.gone.read() if self.running is not None else None
        target = describe_target(self.profile)
        write_summary(terminalreporter, results, target, gone, coverage_lines())
        path = self.config.getoption("report")
        if path:
            text = to_json(
                results,
                profile=self.profile.name,
                target=target,
                strict=self.strict,
                exitstatus=int(exitstatus),
                target_gone=None if gone is None else gone.describe(),
            )
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            terminalreporter.write_line(f"report written to {path}")


def _attach_evidence(item: pytest.Item, report: pytest.TestReport) -> None:
    """What went over the wire, on the item as well as on this report, so that the
    teardown report (the one pytest's JUnit writer reads) carries it too."""
    transcript = evidence.current()
    if transcript is None or not transcript.total:
        return
    if any(name == "nbd_evidence" for name, _ in item.user_properties):
        return
    entry = ("nbd_evidence", transcript.text())
    item.user_properties.append(entry)
    report.user_properties.append(entry)


#: Exception class names the verdict's message leaves out: the suite's own verifiers.
_OWN_EXCEPTIONS = (
    "conformance.spec.SpecViolation: ",
    "conformance.handle.ServerTimeout: ",
    "conformance.liveness.ServerCrashed: ",
    "conformance.liveness.TargetGone: ",
    "AssertionError: ",
)


def _clean(message: str) -> str:
    for prefix in _OWN_EXCEPTIONS:
        message = message.removeprefix(prefix)
    return message


def _message(report: pytest.TestReport, exception: BaseException | None, verdict: Verdict) -> str:
    if verdict in (Verdict.KNOWN, Verdict.XPASSED):
        return str(getattr(report, "wasxfail", ""))
    if isinstance(exception, pytest.skip.Exception):
        return str(exception.msg)
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return _clean(str(crash.message))
        return str(report.longrepr)[-2000:]
    return ""


__all__ = ["ConformancePlugin", "describe_target", "make_profile", "plugin_of"]
