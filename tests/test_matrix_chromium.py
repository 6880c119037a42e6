"""The matrix page as a person sees it: loaded in headless Chromium (Debian's ``chromium``).

Chromium runs the page's script, then prints the DOM (``--dump-dom``) or
paints it (``--screenshot``): that covers views chosen by the URL fragment.
Clicks on the filters and on a cell go through the DevTools protocol on a
pipe (no driver, no port), and what is visible is what Chromium laid out.
Skipped when Chromium is not installed (``./bootstrap`` installs it as root).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from conformance.matrix import render, screenshot
from tests.matrix_dom import Node, parse
from tests.matrix_samples import A, B, C, sample_matrix

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (./bootstrap installs it as root)"
)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("matrix")
    path = directory / "matrix.html"
    path.write_text(render.render(sample_matrix()))
    return path


def chromium(page: Path, fragment: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    profile = page.parent / f"profile-{len(list(page.parent.iterdir()))}"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
            f"{page.as_uri()}#{fragment}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


def rendered(page: Path, fragment: str) -> Node:
    return parse(chromium(page, fragment, "--dump-dom").stdout.decode())


def row_of(dom: Node, nodeid: str) -> Node:
    return next(
        r for r in dom.find_all("tr", "row") if r.find_all("td")[0].attrs["title"] == nodeid
    )


def test_failures_filter_and_a_failures_detail(page):
    dom = rendered(page, "failures&c:nbd-server:test_abort_gets_ack")
    assert "hidden" not in dom.find_all("form")[0].attrs, "the script shows the filters"
    assert "hidden" in row_of(dom, B).attrs, "a check every server passed is filtered out"
    assert "hidden" not in row_of(dom, A).attrs and "hidden" not in row_of(dom, C).attrs
    assert dom.find_all("output")[0].text() == "2 checks shown"
    opened = [d for d in dom.find_all("details") if "open" in d.attrs]
    assert [d.attrs["id"] for d in opened] == ["c:nbd-server:test_abort_gets_ack"]
    detail = opened[0].text()
    for shown in (
        "The server MUST reply with `NBD_REP_ACK`.",
        "closed without <NBD_REP_ACK>",
        "C: OPT_ABORT\nS: EOF",
        "nbd-conformance --nbd-server=nbd-server -k test_abort_gets_ack",
    ):
        assert shown in detail


class PageError(Exception):
    """The page threw, or Chromium refused a command (e.g. its context went away)."""


class DevTools:
    """Just enough of the DevTools protocol, over ``--remote-debugging-pipe``, to script a page.

    Chromium reads commands on its fd 3 and writes replies on its fd 4,
    each a JSON object ended by a NUL byte.
    """

    def __init__(self, page: Path, fragment: str = "") -> None:
        assert CHROMIUM is not None
        commands_r, self.commands = os.pipe()
        self.replies, replies_w = os.pipe()

        def wire() -> None:  # in the child: the pipes become fds 3 and 4
            high_r, high_w = os.dup(commands_r), os.dup(replies_w)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={page.parent / 'profile-devtools'}",
                "--window-size=1200,900",
                f"{page.as_uri()}#{fragment}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            pass_fds=(3, 4),  # kept open once wire() has put the pipes there
        )
        os.close(commands_r)
        os.close(replies_w)
        self.buffer = b""
        self.next_id = 0
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            page_id = next(t["targetId"] for t in targets if t["type"] == "page")
            attached = self.call("Target.attachToTarget", targetId=page_id, flatten=True)
            self.session = attached["sessionId"]
        except BaseException:
            self.close()
            raise

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self.next_id += 1
        message: dict[str, object] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise PageError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"no reply to {method} within 30 s"
            ready, _, _ = select.select([self.replies], [], [], left)
            if ready:
                chunk = os.read(self.replies, 65536)
                assert chunk, "chromium closed the pipe"
                self.buffer += chunk

    def evaluate(self, expression: str) -> object:
        """The value of EXPRESSION (a promise is awaited) in the page."""
        result = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise PageError(str(result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_loaded(self, page: Path, timeout: float = 30) -> None:
        """Until PAGE (not the about:blank before it) has loaded and run its script.

        Each try waits in the page for the load event, at most 0.2 s, then
        says where the page is; a try that a navigation interrupts counts
        as not loaded.
        """
        deadline = time.monotonic() + timeout
        state = """new Promise(function (done) {
            if (document.readyState === 'complete') return done(document.URL);
            window.addEventListener('load', function () { done(document.URL); });
            setTimeout(function () { done('not yet'); }, 200);
        })"""
        while True:
            try:
                if str(self.evaluate(state)).startswith(page.as_uri()):
                    return
            except PageError:
                pass
            assert time.monotonic() < deadline, f"{page} not loaded within {timeout} s"

    def close(self) -> None:
        os.close(self.commands)
        os.close(self.replies)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


#: The check IDs of the rows a person sees (checkVisibility: laid out and not hidden).
VISIBLE_ROWS = """Array.from(document.querySelectorAll('tr.row'))
    .filter(function (r) { return r.checkVisibility(); })
    .map(function (r) { return r.querySelector('td.check').title; })"""


@pytest.fixture
def devtools(page):
    session = DevTools(page)
    try:
        session.wait_loaded(page)
        yield session
    finally:
        session.close()


def test_clicking_the_filters_and_a_cell(devtools):
    assert devtools.evaluate(VISIBLE_ROWS) == [C, A, B]
    devtools.evaluate("document.getElementById('f-differences').click()")
    assert devtools.evaluate(VISIBLE_ROWS) == [C, A]
    assert devtools.evaluate("location.hash") == "#differences"
    devtools.evaluate(
        "var s = document.getElementById('f-section'); s.value = '1';"
        "s.dispatchEvent(new Event('change'))"
    )
    assert devtools.evaluate(VISIBLE_ROWS) == [A]
    assert devtools.evaluate("document.getElementById('f-status').textContent") == "1 checks shown"
    cell = "document.getElementById('c:nbd-server:test_abort_gets_ack')"
    assert devtools.evaluate(f"{cell}.querySelector('.detail').checkVisibility()") is False
    devtools.evaluate(f"{cell}.querySelector('summary').click()")
    assert devtools.evaluate(f"{cell}.querySelector('.detail').checkVisibility()") is True
    shown = devtools.evaluate(f"{cell}.querySelector('.detail').innerText")
    assert "closed without <NBD_REP_ACK>" in shown
    assert "nbd-conformance --nbd-server=nbd-server -k test_abort_gets_ack" in shown


def pixels(png: bytes) -> set[tuple[int, int, int]]:
    """The distinct RGB colours of an 8-bit RGB or RGBA non-interlaced PNG (Chromium's)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    at, data, width, height, channels = 8, b"", 0, 0, 0
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, body = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        at += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            data += body
    raw = zlib.decompress(data)
    stride = width * channels
    previous = bytearray(stride)
    colours: set[tuple[int, int, int]] = set()
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        method, row = line[0], bytearray(line[1:])
        for i in range(stride):
            a = row[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            if method == 1:
                row[i] = (row[i] + a) & 0xFF
            elif method == 2:
                row[i] = (row[i] + b) & 0xFF
            elif method == 3:
                row[i] = (row[i] + (a + b) // 2) & 0xFF
            elif method == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        colours.update((row[x], row[x + 1], row[x + 2]) for x in range(0, stride, channels))
        previous = row
    return colours


def rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


def test_the_grid_is_painted_in_the_verdicts_colours(page):
    shot = page.parent / "shot.png"
    screenshot.take(page, shot, fragment="", size="1000,700")
    colours = pixels(shot.read_bytes())
    look = {outcome: colour for outcome, _, _, colour in render.VERDICTS}
    assert rgb(look["passed"]) in colours
    assert rgb(look["failed"]) in colours
    assert rgb(render.FALLBACK[1]) in colours, "the unknown verdict's cell"
