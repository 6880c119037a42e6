"""A raw file or block device, accessed with positioned I/O.

FLUSH and FUA call fdatasync(); TRIM and zeroing punch holes with fallocate()
where the filesystem can; base:allocation comes from SEEK_DATA/SEEK_HOLE.
A file on tmpfs is memory: its reads are sent from the page cache and its
write payloads are received into a shared mapping of it (the page cache
again, tmpfs_mapping.py), so neither is copied in Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat

from ..protocol.constants import StateFlag
from .base import Backend, Extent, FileRegion, ReadPart
from .tmpfs_mapping import TmpfsMapping

#: Reads up to this size from allocated pages of a tmpfs file are sent as views of
#: its mapping (gathered with other replies), larger ones with sendfile.
SMALL_READ = 64 * 1024

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_HOLE = (StateFlag.HOLE | StateFlag.ZERO).value
_DATA = 0
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

# statfs(2) f_type of the filesystems that keep file data in memory (tmpfs,
# /dev/shm; ramfs): their reads never wait for a device.
_MEMORY_FILESYSTEMS = (0x01021994, 0x858458F6)
_fstatfs = getattr(_libc, "fstatfs", None)


def on_memory_filesystem(fd: int) -> bool:
    """Whether ``fd``'s file lives on tmpfs or ramfs (False when it cannot tell)."""
    if _fstatfs is None:
        return False
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _fstatfs(fd, buf) != 0:
        return False
    # f_type is the first member, a C long (__fsword_t).
    return ctypes.c_long.from_buffer(buf).value in _MEMORY_FILESYSTEMS


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with flags, which the os module does not offer."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(Backend):
    blocking = True

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self._fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self._regular = True
            elif stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self._fd, 0, os.SEEK_END)
                self._regular = False
            else:
                raise OSError(errno.EINVAL, f"{path} is neither a regular file nor a block device")
        except BaseException:
            os.close(self._fd)
            raise
        # Learned on first use: whether hole punching / zero ranges work here.
        self._can_punch: bool | None = None if self._regular else False
        self._can_zero_range: bool | None = None if self._regular else False
        self.can_fast_zero = self._regular
        # A file on tmpfs is memory: nothing done to it waits for a device,
        # so it is served on the event loop, and its reads are sent straight
        # from the page cache (read_parts).
        self._in_memory = self._regular and on_memory_filesystem(self._fd)
        self.blocking = not self._in_memory
        # On tmpfs, write payloads are received into a shared mapping of the
        # file (tmpfs_mapping.py); elsewhere a page fault would wait for the
        # device on the event loop, so those files keep pwrite.
        self._mapping: TmpfsMapping | None = None
        if self._in_memory and not read_only and self.size:
            with contextlib.suppress(OSError, ValueError, OverflowError):  # pwrite it is
                self._mapping = TmpfsMapping(self._fd, self.size, self._allocate)

    def pread(self, length: int, offset: int) -> bytes | bytearray | memoryview:
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        # A short read happens only at end of file (or on a signal): finish it.
        buf = bytearray(data)
        while len(buf) < length:
            more = os.pread(self._fd, length - len(buf), offset + len(buf))
            if not more:
                raise OSError(errno.EIO, "file shrank underneath the export")
            buf += more
        return buf

    def pread_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "file shrank underneath the export")
            done += n

    def read_parts(self, length: int, offset: int) -> list[ReadPart] | None:
        """The range as a region of the file, when the file is in memory (tmpfs).

        A small read of pages the mapping knows to be allocated is a view of
        the mapping instead: the replies of a pass then leave in one sendmsg,
        where each file region costs a sendfile of its own.  Large reads keep
        sendfile, which moves pages to the socket with less work per byte.
        """
        if not self._in_memory:
            return None
        mapping = self._mapping
        if mapping is not None and length <= SMALL_READ and mapping.allocated(length, offset):
            return [mapping.view(length, offset)]
        return [FileRegion(self._fd, offset, length)]

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        if fua:
            os.fdatasync(self._fd)

    def write_view(self, length: int, offset: int) -> memoryview | None:
        """On tmpfs, the file's page cache itself (see tmpfs_mapping.py)."""
        if self._mapping is None or not length:
            return None
        return self._mapping.write_view(length, offset)

    def _allocate(self, offset: int, length: int) -> None:
        fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length)

    def commit_write(self, length: int, offset: int, fua: bool) -> None:
        """The bytes are in the page cache already; FUA only needs fdatasync."""
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def trim(self, length: int, offset: int, fua: bool) -> None:
        # A hint: if the filesystem cannot punch holes, doing nothing is correct.
        if (
            self._try_fallocate(
                "_can_punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
            )
            and fua
        ):
            os.fdatasync(self._fd)

    def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        done = False
        if may_trim:
            done = self._try_fallocate(
                "_can_punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
            )
        if not done:
            done = self._try_fallocate(
                "_can_zero_range", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length
            )
        if not done:
            if fast:
                # FAST_ZERO: fail quickly, leaving the contents unchanged.
                raise OSError(errno.ENOTSUP, "zeroing here is no faster than writing")
            self._write_zeroes(length, offset)
        if fua:
            os.fdatasync(self._fd)

    def _try_fallocate(self, capability: str, mode: int, offset: int, length: int) -> bool:
        if getattr(self, capability) is False or length == 0:
            return length == 0
        if self._mapping is not None:
            self._mapping.forget(length, offset)  # its pages may be given back
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                setattr(self, capability, False)
                return False
            raise
        setattr(self, capability, True)
        return True

    def _write_zeroes(self, length: int, offset: int) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.pwrite(memoryview(zeroes)[:n], offset, fua=False)
            offset += n

    def extents(self, length: int, offset: int) -> list[Extent]:
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        if not self._regular:
            return [Extent(end - offset, _DATA)]
        result: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains up to EOF
                    data_start = end
                elif exc.errno in _UNSUPPORTED:
                    return [Extent(end - offset, _DATA)]
                else:
                    raise
            if data_start > pos:
                stop = min(data_start, end)
                result.append(Extent(stop - pos, _HOLE))
                pos = stop
                continue
            hole_start = os.lseek(self._fd, pos, os.SEEK_HOLE)
            stop = min(hole_start, end)
            result.append(Extent(stop - pos, _DATA))
            pos = stop
        return result

    def next_data(self, offset: int) -> int:
        """SEEK_DATA from ``offset``: the export size when only a hole remains."""
        if not self._regular or offset >= self.size:
            return min(offset, self.size)
        try:
            return min(os.lseek(self._fd, offset, os.SEEK_DATA), self.size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return self.size
            if exc.errno in _UNSUPPORTED:
                return offset  # no hole information: everything is data
            raise

    def read_extents(self, length: int, offset: int) -> list[Extent]:
        """One SEEK_DATA only: SEEK_HOLE can cost time linear in the data run (tmpfs)."""
        end = min(offset + length, self.size)
        if not self._regular or end <= offset:
            return [Extent(max(end - offset, 0), _DATA)]
        mapping = self._mapping
        if mapping is not None and mapping.allocated(end - offset, offset):
            return [Extent(end - offset, _DATA)]  # written in place: no system call
        try:
            data_start = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                return [Extent(end - offset, _DATA)]
            data_start = end
        if data_start >= end:
            return [Extent(end - offset, _HOLE)]
        if data_start > offset:
            return [Extent(data_start - offset, _HOLE), Extent(end - data_start, _DATA)]
        return [Extent(end - offset, _DATA)]

    def cache(self, length: int, offset: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
