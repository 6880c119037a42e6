"""What every structured reply chunk must (and should) look like, on every reply path.

Raw-wire checks (conformance.wire).  test_structured_reply.py checks READ
replies of the happy path; these collect every message the server sends for
a set of requests that covers the reply paths (data, holes, errors, block
status, commands with no payload, an unknown command) and check the rules
that hold for every chunk: flags, the DONE chunk last, sizes, error chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from conformance.spec import MUST, SHOULD, SpecViolation, expect, expect_equal, spec, unsupported
from conformance.wire import (
    Cmd,
    CmdFlag,
    Disconnected,
    Errno,
    ProtocolViolation,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
    WireClient,
)
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import DEFAULT_MAX_PAYLOAD

TYPES = "Values / Transmission phase / Structured reply types"
READ = "Values / Transmission phase / Request types"
STATUS = "Values / Transmission phase / Request types"
CHUNKS = "Protocol phases / Transmission / Structured reply chunk message"

BLOCK = 4096
SECTOR = 512
# Data in blocks 1, 3 and 4, holes (never written) elsewhere.
WRITTEN = {1: bytes(range(256)) * 16, 3: b"\xa5" * BLOCK, 4: b"\x5a" * BLOCK}
SPAN = 16 * BLOCK
UNKNOWN_COMMAND = 0x3F


@dataclasses.dataclass
class Session:
    client: WireClient
    export: m.ExportInfo
    context_id: int | None
    max_payload: int


@contextlib.contextmanager
def _structured(server, *, meta: bool = True, write: bool = False, extended: bool = False):
    """Structured replies (or extended headers), base:allocation where offered."""
    mode = "extended" if extended else "structured"
    with s.reply_mode(server, mode, meta=meta) as session:
        sizes = session.go.block_size
        max_payload = sizes.maximum if sizes is not None else DEFAULT_MAX_PAYLOAD
        if write:
            for block, data in WRITTEN.items():
                expect_equal(session.client.write(block * BLOCK, data).error, Errno.OK, "WRITE")
        yield Session(session.client, session.export, session.context_id, max_payload)


def _requests(session: Session) -> list[tuple[str, int, int, int, int]]:
    """(what, command, flags, offset, length): one request per reply path the export offers."""
    size, flags = session.export.size, session.export.flags
    found = [
        ("READ of data and holes", Cmd.READ, 0, 0, SPAN),
        ("unaligned READ", Cmd.READ, 0, BLOCK - 100, 2 * BLOCK + 300),
        ("READ of a hole", Cmd.READ, 0, 8 * BLOCK, BLOCK),
        ("READ across the end", Cmd.READ, 0, size - BLOCK, 4 * BLOCK),
        ("READ beyond the end", Cmd.READ, 0, size + BLOCK, BLOCK),
        ("READ with an unknown flag", Cmd.READ, 1 << 13, 0, BLOCK),
        ("unknown command", UNKNOWN_COMMAND, 0, 0, 0),
    ]
    if flags & TransmissionFlag.SEND_DF:
        found.append(("READ with NBD_CMD_FLAG_DF", Cmd.READ, CmdFlag.DF, 0, SPAN))
    if flags & TransmissionFlag.SEND_FLUSH:
        found.append(("FLUSH", Cmd.FLUSH, 0, 0, 0))
    if session.context_id is not None:
        found.append(("BLOCK_STATUS", Cmd.BLOCK_STATUS, 0, 0, SPAN))
        found.append(("BLOCK_STATUS of the export", Cmd.BLOCK_STATUS, 0, 0, size))
        found.append(("BLOCK_STATUS beyond the end", Cmd.BLOCK_STATUS, 0, size + BLOCK, BLOCK))
    return found


@dataclasses.dataclass
class Answer:
    what: str
    offset: int
    length: int
    messages: list[m.SimpleReply | m.Chunk]
    late: list[m.SimpleReply | m.Chunk]  # sent for this request after its final message

    @property
    def chunks(self) -> list[m.Chunk]:
        return [x for x in self.messages if isinstance(x, m.Chunk)]


def _collect(session: Session) -> list[Answer]:
    """Each request alone, its messages up to the final one, then a READ to catch late chunks."""
    client = session.client
    answers = []
    for number, (what, cmd, flags, offset, length) in enumerate(_requests(session)):
        cookie = 0xC0DE000000000000 + number
        client.send_request(cmd, offset, length, flags=flags, cookie=cookie)
        client._read_lengths.pop(cookie, None)  # no simple READ data is expected here
        messages: list[m.SimpleReply | m.Chunk] = []
        try:
            while not messages or not _final(messages[-1]):
                messages.append(client.recv_message())
                expect_equal(hex(messages[-1].cookie), hex(cookie), f"cookie of a reply to {what}")
            probe = client.send_request(Cmd.READ, 0, SECTOR, cookie=cookie + (1 << 40))
            late: list[m.SimpleReply | m.Chunk] = []
            while True:
                msg = client.recv_message()
                if msg.cookie != probe:
                    late.append(msg)
                elif _final(msg):
                    break
        except (Disconnected, TimeoutError, ProtocolViolation) as exc:
            raise SpecViolation(
                f"reply to {what}", detail=f"expected complete replies, actual {exc}"
            ) from None
        answers.append(Answer(what, offset, length, messages, late))
    return answers


def _final(msg: m.SimpleReply | m.Chunk) -> bool:
    return isinstance(msg, m.SimpleReply) or msg.done


MODES = ["structured", "extended"]


@contextlib.contextmanager
def _answers(server, mode: str, *, status: bool = False):
    """(session, answers) in MODE; with STATUS, UNSUPPORTED unless base:allocation is offered."""
    with _structured(server, write=True, extended=mode == "extended") as session:
        answers = _collect(session)
        if status and session.context_id is None:
            unsupported("the server does not offer base:allocation")
        yield session, answers


def _each_session(server, **options):
    """(mode, session) with structured replies, then with extended headers where offered: one
    check covers both reply formats on one server (a server start per check is the cost)."""
    for mode in MODES:
        try:
            with _structured(server, extended=mode == "extended", **options) as session:
                yield mode, session
        except pytest.skip.Exception:
            if mode == MODES[0]:
                raise


def _each_answers(server):
    """(mode, session, answers) for each reply format the server offers."""
    for mode, session in _each_session(server, write=True):
        answers = _collect(session)
        for answer in answers:
            answer.what = f"{answer.what}, {mode}"
        yield mode, session, answers


# ------------------------------------------------------------------- flags, DONE


@spec(
    "Values / Transmission phase / Flag fields / Structured reply flags",
    MUST,
    "The server MUST NOT set any other flags without first negotiating the extension with the "
    "client, unless the client can usefully react to the response without interpreting the flag "
    "(for instance if the flag is some form of hint).",
)
@pytest.mark.writes
def test_chunks_set_no_flag_but_done(server):
    """No extension defines another reply flag: every chunk's flags are 0 or NBD_REPLY_FLAG_DONE."""
    for _mode, _, answers in _each_answers(server):
        for answer in answers:
            for chunk in answer.chunks:
                expect_equal(
                    f"{int(chunk.flags) & ~int(ReplyFlag.DONE):#06x}",
                    "0x0000",
                    f"flags other than DONE on a {chunk.type.name} chunk ({answer.what})",
                )


@spec(
    "Values / Transmission phase / Flag fields / Structured reply flags",
    MUST,
    "bit 0, `NBD_REPLY_FLAG_DONE`; the server MUST clear this bit if more structured reply chunks "
    "will be sent for the same client request, and MUST set this bit if this is the final reply.",
)
@pytest.mark.writes
def test_no_chunk_follows_the_done_chunk(server):
    """Every reply path: once a chunk with DONE (or a simple reply) ended a request, nothing
    more comes for it (a READ sent after it is answered first)."""
    for _mode, _, answers in _each_answers(server):
        for answer in answers:
            late = [getattr(x, "type", "simple reply") for x in answer.late]
            expect_equal(late, [], f"messages for the {answer.what} after its final one")


# ---------------------------------------------------------------------- sizes


@spec(
    TYPES,
    MUST,
    "A server MUST NOT send a chunk where any variable-length portion of the chunk is larger than "
    "any advertised maximum payload size (however, the overall chunk may exceed the maximum "
    "payload by the small amount of fixed-length overhead inherent in the chunk type).",
)
@pytest.mark.writes
def test_chunk_variable_portion_within_maximum_payload(server):
    """The data of OFFSET_DATA, the descriptors of BLOCK_STATUS and the message of an error,
    on every reply path plus a READ of the maximum payload (at most 32 MiB)."""
    fixed = {
        ReplyType.OFFSET_DATA: 8,
        ReplyType.BLOCK_STATUS: 4,
        ReplyType.BLOCK_STATUS_EXT: 8,
        ReplyType.ERROR: 6,
        ReplyType.ERROR_OFFSET: 14,
    }
    with _answers(server, "structured") as (session, answers):
        limit = min(session.max_payload, DEFAULT_MAX_PAYLOAD, session.export.size)
        reply = session.client.read(0, limit)
        answers.append(Answer(f"READ of {limit} bytes", 0, limit, list(reply.messages), []))
        for answer in answers:
            for chunk in answer.chunks:
                variable = len(chunk.payload) - fixed.get(chunk.type, 0)
                expect(
                    variable <= session.max_payload,
                    f"variable-length part of a {chunk.type.name} chunk ({answer.what})",
                    f"<= {session.max_payload} bytes (the maximum payload)",
                    variable,
                )


@spec(
    "Values / Transmission phase / Structured reply types",
    MUST,
    "*length* MUST be 4 + (a positive integer multiple of 8).",
)
@pytest.mark.writes
def test_block_status_chunk_length_is_4_plus_8n(server):
    with _answers(server, "structured", status=True) as (_, answers):
        lengths = [
            len(c.payload) for a in answers for c in a.chunks if c.type == ReplyType.BLOCK_STATUS
        ]
        expect(lengths, "NBD_REPLY_TYPE_BLOCK_STATUS chunks", "at least one", lengths)
        for length in lengths:
            expect(
                length >= 12 and (length - 4) % 8 == 0,
                "length of an NBD_REPLY_TYPE_BLOCK_STATUS chunk",
                "4 + 8n with n >= 1",
                length,
            )


@spec(
    "Values / Transmission phase / Structured reply types",
    MUST,
    "This chunk type MUST NOT be used unless extended headers were negotiated with "
    "`NBD_OPT_EXTENDED_HEADERS`.",
)
@pytest.mark.writes
def test_no_block_status_ext_without_extended_headers(server):
    with _answers(server, "structured", status=True) as (_, answers):
        kinds = sorted({c.type.name for a in answers for c in a.chunks})
        expect(
            "BLOCK_STATUS_EXT" not in kinds,
            "chunk types without extended headers",
            "no BLOCK_STATUS_EXT",
            kinds,
        )


# --------------------------------------------------------------------- errors


@spec(
    "Values / Transmission phase / Structured reply types",
    SHOULD,
    "This type SHOULD NOT be used more than once in a structured reply.",
)
@pytest.mark.writes
def test_error_chunk_at_most_once_per_reply(server):
    for _mode, _, answers in _each_answers(server):
        for answer in answers:
            errors = [c for c in answer.chunks if c.type == ReplyType.ERROR]
            expect(
                len(errors) <= 1,
                f"NBD_REPLY_TYPE_ERROR chunks in the reply to the {answer.what}",
                "at most one",
                len(errors),
            )


@spec(
    CHUNKS,
    SHOULD,
    "The server SHOULD prefer sending errors via a structured reply, as the error can then be "
    "accompanied by a string payload to present to a human user.",
)
@pytest.mark.writes
def test_errors_are_sent_as_structured_replies(server):
    """With structured replies negotiated, failed requests of any kind (an unknown command, a
    BLOCK_STATUS beyond the end, an unknown flag) are answered with an error chunk."""
    with _answers(server, "structured") as (_, answers):
        for answer in answers:
            simple_errors = [
                x.error.name for x in answer.messages if isinstance(x, m.SimpleReply) and x.error
            ]
            expect_equal(simple_errors, [], f"simple error replies to the {answer.what}")


# ------------------------------------------------------------------------- DF


@spec(
    READ,
    MUST,
    "A server MAY reject a client's request with the error `NBD_EOVERFLOW` if the length is too "
    "large to send without fragmentation, in which case it MUST NOT send a content chunk",
)
@pytest.mark.writes
@pytest.mark.parametrize("length", [65536 + SECTOR, 1 << 20, 8 << 20])
def test_df_read_above_64k_is_one_chunk_or_eoverflow(server, length):
    """A DF read beyond the 64 KiB every server supports: one content chunk covering it all,
    or NBD_EOVERFLOW and no content chunk at all."""
    with _structured(server, meta=False, write=True) as session:
        if not session.export.flags & TransmissionFlag.SEND_DF:
            unsupported("the server does not advertise NBD_FLAG_SEND_DF")
        reply = session.client.read(0, length, CmdFlag.DF)
        content = [
            c.type.name
            for c in reply.chunks
            if c.type in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE)
        ]
        if reply.error == Errno.EOVERFLOW:
            expect_equal(content, [], f"content chunks of a {length}-byte DF read refused")
        else:
            expect_equal(reply.error, Errno.OK, f"error of a {length}-byte DF read")
            expect_equal(content, ["OFFSET_DATA"], f"content chunks of a {length}-byte DF read")


# -------------------------------------------------------------- chunk alignment

ALIGNMENT = (
    "the server SHOULD use chunks with lengths and offsets as an integer multiple of 512 bytes, "
    "where possible (the first and last chunk of an unaligned read being the most obvious "
    "places for an exception)."
)


@spec(READ, SHOULD, ALIGNMENT)
@pytest.mark.writes
def test_read_chunks_are_512_byte_aligned(server):
    """Aligned and unaligned reads of data and holes: every chunk boundary strictly inside the
    request falls on a multiple of 512."""
    for _mode, _, answers in _each_answers(server):
        for answer in answers:
            if not answer.what.startswith(("READ of", "unaligned READ")):
                continue
            end = answer.offset + answer.length
            for item in (m.parse_chunk(c) for c in answer.chunks):
                if isinstance(item, m.OffsetData | m.OffsetHole):
                    size = len(item.data) if isinstance(item, m.OffsetData) else item.size
                    inner = [
                        b for b in (item.offset, item.offset + size) if answer.offset < b < end
                    ]
                    expect(
                        all(b % SECTOR == 0 for b in inner),
                        f"chunk boundaries inside the {answer.what}",
                        "multiples of 512",
                        f"[{item.offset}, {item.offset + size})",
                    )


# --------------------------------------------------------------- block status


def _status_runs(server):
    """(answer, extents) of every BLOCK_STATUS chunk, in every mode; needs base:allocation."""
    for _mode, session, answers in _each_answers(server):
        if session.context_id is None:
            unsupported("the server does not offer base:allocation")
        for answer in answers:
            for chunk in answer.chunks:
                if chunk.type in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
                    item = m.parse_chunk(chunk)
                    assert isinstance(item, m.BlockStatus)
                    yield answer, item.extents


@spec(
    STATUS,
    SHOULD,
    "The server SHOULD use different *status* values between consecutive descriptors where "
    "feasible, although the client SHOULD be prepared to handle consecutive descriptors with the "
    "same *status* value.",
)
@pytest.mark.writes
def test_consecutive_descriptors_differ_in_status(server):
    for answer, extents in _status_runs(server):
        flags = [f for _, f in extents]
        same = [i for i in range(1, len(flags)) if flags[i] == flags[i - 1]]
        expect_equal(
            same, [], f"descriptors with the status of the one before ({answer.what}: {flags})"
        )


@spec(
    STATUS,
    SHOULD,
    "The server SHOULD use descriptor lengths that are an integer multiple of 512 bytes where "
    "possible (the first and last descriptor of an unaligned query being the most obvious places "
    "for an exception), in part to avoid an amplification effect where a series of smaller "
    "descriptors can cause the server's reply to occupy more bytes than the *length* of the "
    "client's request.",
)
@pytest.mark.writes
def test_descriptor_lengths_are_512_byte_multiples(server):
    """Aligned queries: every descriptor but the last is a multiple of 512 bytes long."""
    for answer, extents in _status_runs(server):
        lengths = [length for length, _ in extents]
        odd = [x for x in lengths[:-1] if x % SECTOR]
        expect_equal(odd, [], f"descriptor lengths not a multiple of 512 ({answer.what})")


@spec(
    STATUS,
    SHOULD,
    "The client SHOULD NOT request a status length of 0; the behavior of a server on such a "
    "request is unspecified although the server SHOULD NOT disconnect.",
)
def test_zero_length_block_status_does_not_disconnect(server):
    for mode, session in _each_session(server):
        if session.context_id is None:
            unsupported("the server does not offer base:allocation")
        after = f"a zero-length BLOCK_STATUS ({mode})"
        try:
            session.client.block_status(BLOCK, 0)  # any answer will do: it is unspecified
        except (Disconnected, TimeoutError, ProtocolViolation) as exc:
            raise SpecViolation(
                f"the connection after {after}", detail=f"expected a reply, actual {exc}"
            ) from None
        s.assert_still_answers(session.client, after)


@spec(
    "Values / Handshake phase / Flag fields / Transmission flags",
    MUST,
    "The server MUST set this transmission flag to 1 if the `NBD_CMD_READ` request supports the "
    "`NBD_CMD_FLAG_DF` flag, and MUST leave this flag clear if neither structured replies nor "
    "extended headers have been negotiated.",
)
def test_df_advertised_exactly_when_supported(server):
    """With reply payloads negotiated: a server that does not advertise NBD_FLAG_SEND_DF does
    not serve a READ with NBD_CMD_FLAG_DF (it refuses it); one that advertises it does."""
    for mode, session in _each_session(server, meta=False):
        advertised = bool(session.export.flags & TransmissionFlag.SEND_DF)
        reply = session.client.read(0, BLOCK, CmdFlag.DF)
        served = reply.error == Errno.OK
        expect_equal(
            f"DF read {'served' if served else 'refused'}",
            f"DF read {'served' if advertised else 'refused'}",
            f"NBD_CMD_FLAG_DF with NBD_FLAG_SEND_DF {'set' if advertised else 'clear'} ({mode})",
        )
