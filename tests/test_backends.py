"""Unit tests of the storage backends (backends/memory.py and backends/file.py).

Both implement one interface, so most checks run against both; the file
backend's durability calls (fdatasync), hole punching and SEEK_DATA/SEEK_HOLE
extents, and the memory backend's sparseness, are checked on their own.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reference_server.backends import file as file_backend
from reference_server.backends.base import Backend, Extent, FileRegion
from reference_server.backends.file import FileBackend
from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
from reference_server.backends.tmpfs_mapping import CHUNK
from reference_server.protocol.constants import StateFlag

SIZE = 4 * 1024 * 1024
HOLE = StateFlag.HOLE | StateFlag.ZERO
DATA = StateFlag(0)
PATTERN = bytes((i * 7 + 3) % 251 for i in range(10000))


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture(params=["memory", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b: Backend
    if request.param == "memory":
        b = MemoryBackend(SIZE)
    else:
        b = FileBackend(str(_sparse_file(tmp_path / "disk.raw", SIZE)))
    yield b
    b.close()


def check_extents(b: Backend, offset: int, length: int) -> list[Extent]:
    """Extents are consecutive, non-empty, and cover [offset, end) exactly."""
    extents = b.extents(length, offset)
    assert extents, "at least one extent is required"
    assert all(e.length > 0 for e in extents)
    assert sum(e.length for e in extents) == min(offset + length, b.size) - offset
    return extents


def allocation(b: Backend, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(start, length, flags) runs, adjacent equal runs merged (flags: StateFlag bits)."""
    runs: list[tuple[int, int, int]] = []
    pos = offset
    for e in check_extents(b, offset, length):
        if runs and runs[-1][2] == e.flags:
            runs[-1] = (runs[-1][0], runs[-1][1] + e.length, e.flags)
        else:
            runs.append((pos, e.length, e.flags))
        pos += e.length
    return runs


# ---------------------------------------------------------- the interface


def test_fresh_export_reads_zeroes(backend: Backend) -> None:
    assert backend.size == SIZE
    assert backend.pread(8192, SIZE - 8192) == bytes(8192)


@pytest.mark.parametrize("offset", [0, 1, PAGE_SIZE - 3, 3 * PAGE_SIZE + 5, SIZE - len(PATTERN)])
def test_write_then_read_round_trips(backend: Backend, offset: int) -> None:
    backend.pwrite(PATTERN, offset, fua=False)
    assert bytes(backend.pread(len(PATTERN), offset)) == PATTERN
    before = bytes(backend.pread(1, offset - 1)) if offset else b""
    assert before in (b"", b"\x00")


def test_write_accepts_memoryview_and_bytearray(backend: Backend) -> None:
    backend.pwrite(memoryview(PATTERN)[10:20], 0, fua=True)
    backend.pwrite(bytearray(b"xyz"), 100, fua=False)
    assert bytes(backend.pread(10, 0)) == PATTERN[10:20]
    assert bytes(backend.pread(3, 100)) == b"xyz"


@pytest.mark.parametrize("may_trim", [True, False])
def test_zero_makes_a_range_read_as_zero(backend: Backend, may_trim: bool) -> None:
    backend.pwrite(PATTERN * 10, 0, fua=False)
    backend.zero(50000, 1234, may_trim=may_trim, fast=False, fua=True)
    expected = (PATTERN * 10)[:1234] + bytes(50000) + (PATTERN * 10)[51234:]
    assert bytes(backend.pread(len(PATTERN) * 10, 0)) == expected


def test_zero_of_nothing_is_harmless(backend: Backend) -> None:
    backend.pwrite(b"abc", 0, fua=False)
    backend.zero(0, 0, may_trim=True, fast=False, fua=False)
    backend.trim(0, 1, fua=False)
    assert bytes(backend.pread(3, 0)) == b"abc"


def test_trim_leaves_data_outside_the_range_alone(backend: Backend) -> None:
    backend.pwrite(PATTERN * 20, 0, fua=False)
    backend.trim(2 * PAGE_SIZE, PAGE_SIZE, fua=True)
    data = PATTERN * 20
    assert bytes(backend.pread(PAGE_SIZE, 0)) == data[:PAGE_SIZE]
    tail = 3 * PAGE_SIZE
    assert bytes(backend.pread(len(data) - tail, tail)) == data[tail:]


def test_flush_and_cache_succeed(backend: Backend) -> None:
    backend.pwrite(b"x", 0, fua=False)
    backend.flush()
    backend.cache(SIZE, 0)
    assert bytes(backend.pread(1, 0)) == b"x"


def test_extents_of_a_fresh_export_are_one_hole(backend: Backend) -> None:
    runs = allocation(backend, 0, SIZE)
    assert runs == [(0, SIZE, HOLE)]


def test_extents_show_written_data(backend: Backend) -> None:
    start = 8 * PAGE_SIZE
    backend.pwrite(b"\xff" * PAGE_SIZE, start, fua=False)
    runs = allocation(backend, 0, SIZE)
    # Allocation granularity differs (filesystem blocks, memory pages); the
    # written range is data, and both ends of the export are still holes.
    data = [(s, n) for s, n, f in runs if not f & StateFlag.ZERO]
    assert data, runs
    assert all(s <= start and start + PAGE_SIZE <= s + n for s, n in data[:1])
    assert runs[0][2] == HOLE and runs[-1][2] == HOLE


def test_extents_are_clipped_to_the_export(backend: Backend) -> None:
    assert check_extents(backend, SIZE - 100, 1000)
    assert backend.extents(10, SIZE) == []


def test_extents_from_an_unaligned_offset(backend: Backend) -> None:
    backend.pwrite(b"\x01" * 100, PAGE_SIZE, fua=False)
    check_extents(backend, 17, 3 * PAGE_SIZE)


def test_zeroed_data_is_never_reported_as_nonzero_hole(backend: Backend) -> None:
    # A hole reported with ZERO must read as zeroes.
    backend.pwrite(PATTERN * 30, 0, fua=False)
    backend.zero(4 * PAGE_SIZE, 0, may_trim=True, fast=False, fua=False)
    pos = 0
    for e in check_extents(backend, 0, 8 * PAGE_SIZE):
        if e.flags & StateFlag.ZERO:
            assert bytes(backend.pread(e.length, pos)) == bytes(e.length)
        pos += e.length


# ----------------------------------------------------------------- memory


def test_memory_backend_is_sparse_for_one_tebibyte() -> None:
    tib = 1 << 40
    b = MemoryBackend(tib)
    b.pwrite(b"end", tib - 3, fua=False)
    b.pwrite(b"start", 0, fua=False)
    assert b.allocated_bytes == 2 * PAGE_SIZE
    started = time.monotonic()
    runs = allocation(b, 0, tib)
    assert time.monotonic() - started < 2, "extents of a sparse 1 TiB export must be cheap"
    assert runs == [
        (0, PAGE_SIZE, DATA),
        (PAGE_SIZE, tib - 2 * PAGE_SIZE, HOLE),
        (tib - PAGE_SIZE, PAGE_SIZE, DATA),
    ]
    b.zero(tib, 0, may_trim=True, fast=True, fua=False)
    assert b.allocated_bytes == 0
    assert bytes(b.pread(3, tib - 3)) == bytes(3)


def test_memory_written_zeroes_are_data_until_trimmed() -> None:
    # The store cannot tell written zeroes from data without reading them
    # back; DATA is always a correct answer, and a trim gives them back.
    b = MemoryBackend(SIZE)
    b.pwrite(bytes(3 * PAGE_SIZE), 100, fua=False)
    assert bytes(b.pread(3 * PAGE_SIZE, 100)) == bytes(3 * PAGE_SIZE)
    assert b.allocated_bytes == 4 * PAGE_SIZE
    b.trim(SIZE, 0, fua=False)
    assert b.allocated_bytes == 0
    assert allocation(b, 0, SIZE) == [(0, SIZE, HOLE)]


def test_memory_partial_zero_frees_a_page_that_becomes_all_zero() -> None:
    b = MemoryBackend(SIZE)
    b.pwrite(b"ab", 10, fua=False)
    b.zero(1, 10, may_trim=True, fast=False, fua=False)
    assert b.allocated_bytes == PAGE_SIZE
    b.trim(1, 11, fua=False)
    assert b.allocated_bytes == 0


def test_memory_trim_across_pages_keeps_the_partial_ends() -> None:
    # [PAGE_SIZE - 10, 4 * PAGE_SIZE + 10): two partial pages around three whole ones.
    b = MemoryBackend(SIZE)
    data = PATTERN * 70  # beyond six pages
    b.pwrite(data, 0, fua=False)
    start, end = PAGE_SIZE - 10, 4 * PAGE_SIZE + 10
    b.trim(end - start, start, fua=False)
    expected = data[:start] + bytes(end - start) + data[end : 6 * PAGE_SIZE]
    assert bytes(b.pread(6 * PAGE_SIZE, 0)) == expected
    assert allocation(b, 0, 6 * PAGE_SIZE) == [
        (0, PAGE_SIZE, DATA),
        (PAGE_SIZE, 3 * PAGE_SIZE, HOLE),
        (4 * PAGE_SIZE, 2 * PAGE_SIZE, DATA),
    ]


@pytest.mark.parametrize("size", [1, 4095, PAGE_SIZE + 1, 3 * PAGE_SIZE + 1000])
def test_memory_export_of_a_size_that_is_no_multiple_of_the_page(size: int) -> None:
    b = MemoryBackend(size)
    last_page = (size - 1) // PAGE_SIZE * PAGE_SIZE
    tail = PATTERN[: min(size - last_page, 100)]  # within the short last page
    b.pwrite(tail, size - len(tail), fua=False)
    assert bytes(b.pread(len(tail), size - len(tail))) == tail
    runs = allocation(b, 0, size)
    assert runs[-1] == (last_page, size - last_page, DATA), runs
    assert sum(n for _, n, _ in runs) == size
    assert bytes(b.read_parts(size, 0)[0]) == b.pread(size, 0)  # type: ignore[arg-type]
    # A trim to the end releases the short last page as a whole.
    b.trim(size - last_page, last_page, fua=False)
    assert b.allocated_bytes == 0
    assert bytes(b.pread(size, 0)) == bytes(size)
    b.zero(size, 0, may_trim=False, fast=False, fua=False)
    assert allocation(b, 0, size) == [(0, size, DATA)], "NO_HOLE must provision"
    assert bytes(b.pread(size, 0)) == bytes(size)
    b.close()


def test_memory_export_of_size_zero() -> None:
    b = MemoryBackend(0)
    assert b.extents(1, 0) == []
    assert b.pread(0, 0) == b""
    b.pwrite(b"", 0, fua=True)
    b.zero(0, 0, may_trim=True, fast=False, fua=False)
    b.trim(0, 0, fua=False)
    assert b.allocated_bytes == 0
    view = b.write_view(0, 0)
    assert view is not None and len(view) == 0
    b.close()


def test_memory_too_large_to_map_is_a_clear_oserror() -> None:
    # 2^50 bytes exceed x86-64's 47-bit user address space; a kernel that
    # maps them anyway must still serve them.
    for size in (1 << 50, 1 << 63):
        try:
            b = MemoryBackend(size)
        except OSError as exc:
            assert exc.errno == errno.ENOMEM and f"cannot map {size} bytes" in str(exc)
            continue
        b.pwrite(b"end", size - 3, fua=False)
        assert bytes(b.pread(3, size - 3)) == b"end"
        b.close()


def _anonymous_rss() -> int:
    """Bytes of anonymous memory this process holds (RssAnon in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_memory_costs_what_is_written_and_trim_gives_it_back() -> None:
    before = _anonymous_rss()
    b = MemoryBackend(1 << 40)
    assert _anonymous_rss() - before < 4 << 20, "an idle 1 TiB export must cost almost nothing"
    b.extents(1 << 40, 0)
    b.pread(1 << 20, 1 << 39)  # reading a hole maps the kernel's zero page, nothing more
    assert _anonymous_rss() - before < 4 << 20
    b.pwrite(b"\x01" * (32 << 20), 1 << 30, fua=False)
    written = _anonymous_rss() - before
    assert written >= 30 << 20, f"32 MiB written, only {written} bytes resident"
    b.trim(32 << 20, 1 << 30, fua=False)
    assert _anonymous_rss() - before < 4 << 20, "trim must give the pages back"
    assert bytes(b.pread(4096, 1 << 30)) == bytes(4096)
    b.close()


def test_memory_write_view_is_the_store_and_counts_as_data_at_once() -> None:
    b = MemoryBackend(SIZE)
    offset = 3 * PAGE_SIZE - 100
    view = b.write_view(len(PATTERN), offset)
    assert view is not None and len(view) == len(PATTERN) and not view.readonly
    # Half of it arrives: already data, never a hole that claims to read zero.
    view[:5000] = PATTERN[:5000]
    assert bytes(b.pread(5000, offset)) == PATTERN[:5000]
    assert all(f == DATA for s, n, f in allocation(b, offset, len(PATTERN)))
    view[5000:] = PATTERN[5000:]
    b.commit_write(len(PATTERN), offset, fua=True)
    assert bytes(b.pread(len(PATTERN), offset)) == PATTERN


def test_memory_commit_counts_pages_a_concurrent_trim_forgot() -> None:
    # Another connection trims the range while the payload is arriving; the
    # bytes that arrive after it must not sit in pages reported as holes.
    b = MemoryBackend(SIZE)
    view = b.write_view(PAGE_SIZE, 0)
    assert view is not None
    b.trim(PAGE_SIZE, 0, fua=False)
    view[:] = b"\x05" * PAGE_SIZE
    b.commit_write(PAGE_SIZE, 0, fua=False)
    assert allocation(b, 0, PAGE_SIZE) == [(0, PAGE_SIZE, DATA)]
    assert bytes(b.pread(PAGE_SIZE, 0)) == b"\x05" * PAGE_SIZE


# ------------------------------------------------------------------- file


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[FileBackend, Path]]:
    path = _sparse_file(tmp_path / "disk.raw", SIZE)
    b = FileBackend(str(path))
    yield b, path
    b.close()


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def test_file_fua_write_and_flush_call_fdatasync(
    disk: tuple[FileBackend, Path], syncs: list[int]
) -> None:
    b, _ = disk
    b.pwrite(b"x", 0, fua=False)
    assert syncs == []
    b.pwrite(b"x", 0, fua=True)
    assert len(syncs) == 1
    b.flush()
    assert len(syncs) == 2
    b.zero(4096, 0, may_trim=False, fast=False, fua=True)
    assert len(syncs) == 3


def test_file_writes_reach_the_file(disk: tuple[FileBackend, Path]) -> None:
    b, path = disk
    b.pwrite(PATTERN, 12345, fua=True)
    with open(path, "rb") as f:
        f.seek(12345)
        assert f.read(len(PATTERN)) == PATTERN
    assert path.stat().st_size == SIZE


def test_file_trim_punches_a_hole_where_the_filesystem_can(
    disk: tuple[FileBackend, Path],
) -> None:
    b, path = disk
    b.pwrite(b"\x01" * (1 << 20), 0, fua=True)
    allocated = path.stat().st_blocks
    b.trim(1 << 20, 0, fua=False)
    if b._can_punch is False:
        pytest.skip("this filesystem cannot punch holes")
    assert path.stat().st_blocks < allocated
    assert path.stat().st_size == SIZE, "trim must keep the size"
    assert allocation(b, 0, 1 << 20) == [(0, 1 << 20, HOLE)]


def test_file_zero_with_no_hole_keeps_the_range_allocated(
    disk: tuple[FileBackend, Path],
) -> None:
    b, _ = disk
    b.pwrite(b"\x01" * (1 << 20), 0, fua=False)
    b.zero(1 << 20, 0, may_trim=False, fast=False, fua=False)
    assert bytes(b.pread(1 << 20, 0)) == bytes(1 << 20)
    assert not any(f & StateFlag.HOLE for _, _, f in allocation(b, 0, 1 << 20))


def _no_fallocate(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_backend, "fallocate", unsupported)


def test_file_fast_zero_without_fallocate_fails_fast_and_changes_nothing(
    disk: tuple[FileBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _ = disk
    _no_fallocate(monkeypatch)
    b.pwrite(PATTERN, 0, fua=False)
    with pytest.raises(OSError) as info:
        b.zero(len(PATTERN), 0, may_trim=True, fast=True, fua=False)
    assert info.value.errno == errno.ENOTSUP
    assert bytes(b.pread(len(PATTERN), 0)) == PATTERN
    # Without FAST_ZERO it falls back to writing zeroes.
    b.zero(len(PATTERN), 0, may_trim=True, fast=False, fua=False)
    assert bytes(b.pread(len(PATTERN), 0)) == bytes(len(PATTERN))


def test_file_trim_without_fallocate_is_a_harmless_no_op(
    disk: tuple[FileBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _ = disk
    _no_fallocate(monkeypatch)
    b.pwrite(PATTERN, 0, fua=False)
    b.trim(len(PATTERN), 0, fua=True)
    assert bytes(b.pread(len(PATTERN), 0)) in (PATTERN, bytes(len(PATTERN)))


def test_file_unexpected_fallocate_error_is_raised(
    disk: tuple[FileBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _ = disk

    def failing(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(file_backend, "fallocate", failing)
    with pytest.raises(OSError) as info:
        b.zero(4096, 0, may_trim=True, fast=False, fua=False)
    assert info.value.errno == errno.EIO


def test_file_read_only_refuses_writes(tmp_path: Path) -> None:
    path = _sparse_file(tmp_path / "ro.raw", SIZE)
    b = FileBackend(str(path), read_only=True)
    try:
        with pytest.raises(OSError):
            b.pwrite(b"x", 0, fua=False)
        assert bytes(b.pread(4, 0)) == bytes(4)
    finally:
        b.close()


def test_file_missing_path_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileBackend(str(tmp_path / "missing.raw"))


def test_file_that_is_neither_regular_nor_block_device_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keeps open() of the FIFO from blocking
    try:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError) as info:
            FileBackend(str(fifo))
        assert info.value.errno == errno.EINVAL
        assert len(os.listdir("/proc/self/fd")) == before, "file descriptor leaked"
    finally:
        os.close(fd)


def test_file_close_is_idempotent(tmp_path: Path) -> None:
    b = FileBackend(str(_sparse_file(tmp_path / "c.raw", 4096)))
    b.close()
    b.close()


def test_file_extents_when_seek_data_is_unsupported(
    disk: tuple[FileBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _ = disk
    real_lseek: Callable[[int, int, int], int] = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "no SEEK_DATA")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    assert b.extents(SIZE, 0) == [Extent(SIZE, DATA)]


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, SIZE),
        (1, 3 * PAGE_SIZE),
        (5 * PAGE_SIZE - 7, 100),
        (SIZE - 9, 9),
        (10 * PAGE_SIZE, 4096),
    ],
)
def test_read_extents_cover_the_range_and_zero_means_zero(
    backend: Backend, offset: int, length: int
) -> None:
    # Structured reads send ZERO extents as OFFSET_HOLE chunks: they must read as zero.
    for start in (2 * PAGE_SIZE, 5 * PAGE_SIZE - 3, SIZE - 5):
        backend.pwrite(b"\x07" * 5, start, fua=False)
    extents = backend.read_extents(length, offset)
    assert all(e.length > 0 for e in extents)
    assert sum(e.length for e in extents) == length
    pos = offset
    for e in extents:
        if e.flags & StateFlag.ZERO:
            assert bytes(backend.pread(e.length, pos)) == bytes(e.length), f"at {pos}"
        pos += e.length


def test_file_that_shrank_underneath_reads_as_an_error(disk: tuple[FileBackend, Path]) -> None:
    b, path = disk
    os.truncate(path, 4096)
    with pytest.raises(OSError) as info:
        b.pread(8192, 0)
    assert info.value.errno == errno.EIO


def test_file_read_extents_fall_back_to_data_without_seek_data(
    disk: tuple[FileBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _ = disk

    def lseek(fd: int, pos: int, how: int) -> int:
        raise OSError(errno.EINVAL, "no SEEK_DATA")

    monkeypatch.setattr(os, "lseek", lseek)
    assert b.read_extents(4096, 0) == [Extent(4096, DATA)]


# ------------------------------------------------ parts a reply carries as they are


def test_memory_read_parts_are_the_bytes_holes_included() -> None:
    b = MemoryBackend(SIZE)
    b.pwrite(PATTERN, PAGE_SIZE - 100, fua=False)
    offset, length = PAGE_SIZE - 300, 3 * PAGE_SIZE
    parts = b.read_parts(length, offset)
    assert b"".join(bytes(p) for p in parts) == b.pread(length, offset)  # type: ignore[arg-type]


def test_file_on_tmpfs_is_served_on_the_loop_and_read_as_a_region() -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm (tmpfs) here")
    path = Path("/dev/shm") / f"test-backends-{os.getpid()}.raw"
    _sparse_file(path, SIZE)
    b = FileBackend(str(path))
    try:
        assert not b.blocking, "tmpfs never waits for a device"
        parts = b.read_parts(4096, 8192)
        assert parts is not None and len(parts) == 1
        (region,) = parts
        assert isinstance(region, FileRegion) and (region.offset, region.length) == (8192, 4096)
        assert os.pread(region.fd, 4096, region.offset) == b.pread(4096, 8192)
    finally:
        b.close()
        path.unlink()


def test_file_on_disk_blocks_and_has_no_parts(disk: tuple[FileBackend, Path]) -> None:
    b, path = disk
    fd = os.open(path, os.O_RDONLY)
    try:
        if file_backend.on_memory_filesystem(fd):
            pytest.skip("the temporary directory is on tmpfs")
    finally:
        os.close(fd)
    assert b.blocking
    assert b.read_parts(4096, 0) is None


# ------------------------------------------------ payloads received in place


@pytest.fixture
def tmpfs_file() -> Iterator[Path]:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm (tmpfs) here")
    path = Path("/dev/shm") / f"test-backends-view-{os.getpid()}.raw"
    _sparse_file(path, SIZE)
    yield path
    path.unlink(missing_ok=True)


def test_file_on_tmpfs_offers_its_page_cache_as_the_write_view(
    tmpfs_file: Path, syncs: list[int]
) -> None:
    b = FileBackend(str(tmpfs_file))
    try:
        offset = 3 * PAGE_SIZE - 7
        view = b.write_view(len(PATTERN), offset)
        assert view is not None and len(view) == len(PATTERN) and not view.readonly
        view[:] = PATTERN
        # The same page cache that pread and sendfile read: visible at once.
        assert b.pread(len(PATTERN), offset) == PATTERN
        with open(tmpfs_file, "rb") as f:
            f.seek(offset)
            assert f.read(len(PATTERN)) == PATTERN
        b.commit_write(len(PATTERN), offset, fua=False)
        assert syncs == []
        b.commit_write(len(PATTERN), offset, fua=True)
        assert len(syncs) == 1, "FUA must still reach fdatasync"
        data = [(s, n) for s, n, f in allocation(b, 0, SIZE) if not f & StateFlag.ZERO]
        assert data and data[0][0] <= offset and offset + len(PATTERN) <= sum(data[-1])
    finally:
        b.close()


def test_file_on_tmpfs_that_cannot_allocate_takes_the_pwrite_path(
    tmpfs_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full tmpfs would make the page fault a SIGBUS: the view is refused
    # and pwrite reports ENOSPC for that one write instead.
    def full(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    b = FileBackend(str(tmpfs_file))
    try:
        monkeypatch.setattr(file_backend, "fallocate", full)
        assert b.write_view(4096, 0) is None
    finally:
        b.close()


def test_file_without_a_view_read_only_on_disk_or_empty(tmp_path: Path, tmpfs_file: Path) -> None:
    read_only = FileBackend(str(tmpfs_file), read_only=True)
    assert read_only.write_view(4096, 0) is None
    read_only.close()
    empty = tmpfs_file.with_name(tmpfs_file.name + ".empty")
    _sparse_file(empty, 0)
    try:
        b = FileBackend(str(empty))
        assert b.write_view(0, 0) is None
        b.close()
    finally:
        empty.unlink()
    disk = FileBackend(str(_sparse_file(tmp_path / "d.raw", SIZE)))
    try:
        if disk.blocking:  # a page fault there would wait for the device
            assert disk.write_view(4096, 0) is None
    finally:
        disk.close()


def test_file_close_with_a_view_still_held_is_harmless(tmpfs_file: Path) -> None:
    b = FileBackend(str(tmpfs_file))
    view = b.write_view(4096, 0)
    assert view is not None
    b.close()  # the mapping stays until the last view goes
    view[:3] = b"abc"
    del view
    with open(tmpfs_file, "rb") as f:
        assert f.read(3) == b"abc"


def test_file_on_tmpfs_allocates_each_chunk_once_until_it_is_trimmed(
    tmpfs_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = file_backend.fallocate

    def counting(fd: int, mode: int, offset: int, length: int) -> None:
        if mode == file_backend.FALLOC_FL_KEEP_SIZE:  # allocating, not punching
            calls.append((offset, length))
        real(fd, mode, offset, length)

    monkeypatch.setattr(file_backend, "fallocate", counting)
    b = FileBackend(str(tmpfs_file))
    try:
        assert b.write_view(4096, CHUNK + 100) is not None
        assert calls == [(CHUNK, CHUNK)], "a write allocates the whole chunks it touches"
        assert b.write_view(100, CHUNK + 5000) is not None
        assert b.write_view(4096, CHUNK) is not None
        assert len(calls) == 1, "a rewrite of allocated chunks costs no system call"
        assert b.write_view(2 * CHUNK, CHUNK) is not None
        assert calls[1:] == [(CHUNK, 2 * CHUNK)]
        b.trim(10, CHUNK + 3, fua=False)  # punches part of the first chunk
        assert b.write_view(4096, CHUNK) is not None
        assert calls[2:] == [(CHUNK, CHUNK)], "a trimmed chunk is allocated again"
    finally:
        b.close()


def test_small_reads_of_pages_written_in_place_are_views_of_the_mapping(tmpfs_file: Path) -> None:
    """Written through the write view, a small read is a view (gathered into one sendmsg
    with other replies) and its extents need no lseek; a large read, a read reaching
    unwritten pages, or one after a trim is a file region (sendfile) again."""
    b = FileBackend(str(tmpfs_file))
    try:
        offset = 4 * CHUNK
        data = bytes(range(256)) * 256  # 64 KiB
        view = b.write_view(len(data), offset)
        assert view is not None
        view[:] = data
        b.commit_write(len(data), offset, fua=False)
        parts = b.read_parts(4096, offset + 4096)
        assert parts is not None and len(parts) == 1 and isinstance(parts[0], memoryview)
        assert bytes(parts[0]) == data[4096:8192]
        assert b.read_extents(4096, offset + 4096) == [Extent(4096, 0)]
        # Too large, or reaching past what was written: a file region.
        assert isinstance(b.read_parts(128 * 1024, offset)[0], FileRegion)  # type: ignore[index]
        beyond = b.read_parts(4096, offset + len(data))
        assert beyond is not None and isinstance(beyond[0], FileRegion)
        b.trim(len(data), offset, fua=False)
        after = b.read_parts(4096, offset)
        assert after is not None and isinstance(after[0], FileRegion)
    finally:
        b.close()
