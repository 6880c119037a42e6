"""Local Sphinx extension: keeps the documentation honest about the code.

At build time it

* checks that every option of the reference server's argparse parser, and
  every option the conformance plugin adds to pytest, is documented with an
  ``.. option::`` directive on its manual page, and that no documented option
  has disappeared from the code;
* runs ``docs/traces/capture.py --check``: the protocol tour's captured
  exchanges must match what the reference server does now;
* generates the traceability page (``.. nbd-traceability::``) from the
  requirement ledger (``conformance/requirements/*.toml``), after checking it
  against the key-word sentences of ``docs/spec/proto.md`` and the
  ``@spec(...)`` tags of the conformance checks, found by static analysis
  (the suite is never imported);
* renders the findings page (``.. nbd-findings::``) from ``reports/*.json``;
* draws the state diagrams of the architecture page (``.. nbd-state-diagram::
  MODULE[:TABLE]``) from the transition tables in the code, and checks that
  each transition cites a heading of the specification.

Every problem is a Sphinx warning, so ``sphinx-build -W`` (``tox -e docs``)
fails on it.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

from .common import DYNAMIC_PAGES, REPO, _para, _table
from .diagrams import StateDiagramDirective
from .findings import FindingsDirective
from .manpages import PlainInternalLinks
from .options import check_options
from .traceability import TraceabilityDirective
from .traces import check_traces

__all__ = ["REPO", "_para", "_table", "setup"]


def always_reread(
    app: Sphinx, env: BuildEnvironment, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    """The generated pages depend on files outside docs/: read them every time."""
    return [name for name in DYNAMIC_PAGES if name in env.found_docs]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("nbd-traceability", TraceabilityDirective)
    app.add_directive("nbd-findings", FindingsDirective)
    app.add_directive("nbd-state-diagram", StateDiagramDirective)
    app.add_post_transform(PlainInternalLinks)
    app.connect("builder-inited", check_traces)
    app.connect("env-get-outdated", always_reread)
    app.connect("env-check-consistency", check_options)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
