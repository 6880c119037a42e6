"""A small matrix for the page's tests: two servers, three checks of known shapes."""

from __future__ import annotations

from conformance.matrix import merge

A = "conformance/test_options.py::test_abort_gets_ack"
B = "conformance/test_read.py::test_read_returns_what_was_written[one-byte]"
C = "conformance/test_tls.py::test_starttls_gets_ack_then_tls"


def check(nodeid, outcome, message="", section="Values / Option types", **extra):
    return {
        "id": nodeid.rsplit("::", 1)[-1],
        "nodeid": nodeid,
        "section": section,
        "level": "MUST",
        "quote": "The server MUST reply with `NBD_REP_ACK`.",
        "outcome": outcome,
        "message": message,
        **extra,
    }


def sample_matrix() -> dict:
    """Two servers, three checks: passed, failed with evidence, a verdict the page does not know."""
    reference = {
        "profile": "reference",
        "target": "--nbd-server=reference",
        "version": "nbd-reference-server 0.1.0",
        "checks": [
            check(A, "passed"),
            check(B, "passed"),
            check(C, "passed", section="TLS support"),
        ],
    }
    other = {
        "profile": "nbd-server",
        "target": "--nbd-server=nbd-server",
        "checks": [
            check(A, "failed", "closed without <NBD_REP_ACK>", evidence=["C: OPT_ABORT", "S: EOF"]),
            check(B, "passed"),
            check(C, "brand-new-verdict", section="TLS support"),
        ],
    }
    return merge.merge([("reference", reference), ("nbd-server", other)])
