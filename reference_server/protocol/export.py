"""What the handshake tells a client about an export, and what it negotiated.

"Values / Handshake phase / Transmission flags" defines which flags describe
an export; "Size constraints" defines the three block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import DEFAULT_MAX_PAYLOAD, TransmissionFlag


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """ "Size constraints": minimum, preferred and maximum payload."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_PAYLOAD

    @property
    def is_default(self) -> bool:
        """True when a client that never asked for NBD_INFO_BLOCK_SIZE is safe."""
        return self.minimum == 1


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export as the protocol sees it: no storage, only what is advertised."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    multi_conn: bool = False
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    rotational: bool = False
    block_sizes: BlockSizes = field(default_factory=BlockSizes)
    # On a server with TLS, whether the export is served only over TLS (the
    # spec's "TLS-only export"); a server without TLS ignores it.  A server
    # whose every export is TLS-only runs in FORCEDTLS mode (tls_policy.py).
    tls_only: bool = True
    # Whether x-reference:next-data (next_data.py) is offered beside
    # base:allocation (``--next-data``).
    next_data: bool = False

    def transmission_flags(self, structured_replies: bool) -> TransmissionFlag:
        """Advertise exactly what is implemented ("Transmission flags").

        SEND_DF MUST be clear unless structured replies are negotiated.  Write
        features are not advertised on a read-only export: they would only fail.
        """
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if self.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
            if self.can_zero:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= TransmissionFlag.SEND_FAST_ZERO
        if structured_replies:
            flags |= TransmissionFlag.SEND_DF
        if self.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache:
            flags |= TransmissionFlag.SEND_CACHE
        if self.rotational:
            flags |= TransmissionFlag.ROTATIONAL
        return flags


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of option haggling, handed to the transmission phase."""

    export: ExportInfo
    flags: TransmissionFlag
    structured_replies: bool
    extended_headers: bool
    # metadata context id -> name, selected for this export.
    meta_contexts: dict[int, str]
    # NBD_INFO_BLOCK_SIZE was requested with NBD_OPT_GO: the client promised to obey.
    block_sizes_agreed: bool
