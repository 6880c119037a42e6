"""What docs/traces/capture.py runs: the scenarios, how they run, and the annotated raw session.

``scenarios`` says what each exchange of the protocol tour is, ``scenario_runs``
runs one against the reference server and normalises the result,
``annotation`` and ``raw_session`` make the annotated hex dumps.
"""


class CaptureError(Exception):
    """A scenario could not be captured (a tool missing, a client failed...)."""
