"""A BROKEN reference server: LIST_META_CONTEXT names x-reference:next-data, then ACKs.

The EXTENDED_HEADERS extension: a server that advertises a context with
64-bit status to a client without extended headers "SHOULD then conclude the
overall response with the NBD_REP_ERR_EXT_HEADER_REQD error".  This one
concludes with NBD_REP_ACK; everything else, SET_META_CONTEXT included, is
the reference server's.  For the project's own tests only
(tests/test_suite_can_fail.py).

    wide_list_ends_with_ack.py [reference server options...] --next-data
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from patched_server import import_reference_server, serve_with


def main() -> int:
    import_reference_server()
    from reference_server.protocol import meta_contexts
    from reference_server.protocol.export import ExportInfo

    answer = meta_contexts.answer

    def list_ends_with_ack(
        export: ExportInfo, queries: Sequence[bytes], setting: bool, extended: bool
    ) -> meta_contexts.Answer:
        found = answer(export, queries, setting, extended)
        return found if setting else dataclasses.replace(found, held_back="")

    return serve_with(meta_contexts, "answer", list_ends_with_ack, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
