"""The matrix page as a person sees it: loaded in headless Chromium (Debian's ``chromium``).

Chromium runs the page's script, then prints the DOM (``--dump-dom``) or
paints it (``--screenshot``).  The filters and the cell detail are driven
by the URL fragment, the same code path as the check boxes, so a plain
command line is enough: no driver, no debugging protocol.  Skipped when
Chromium is not installed (``./bootstrap`` installs it as root).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
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


def test_differences_within_one_section(page):
    dom = rendered(page, "differences&section=1")
    sections = dom.find_all("tbody", "section")
    assert "hidden" in sections[0].attrs, "the other section disappears"
    assert "hidden" not in row_of(dom, A).attrs
    assert "hidden" in row_of(dom, B).attrs, "both servers passed it: no difference"
    assert dom.find_all("output")[0].text() == "1 checks shown"


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
