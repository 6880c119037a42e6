"""Child processes of the end-to-end tests: started to die with us, stopped by PID.

The tests' names for the server harness (:mod:`conformance.servers.process`),
with the failure a test wants: a wait that times out fails the test.
"""

from __future__ import annotations

from collections.abc import Callable

from conformance.servers import process
from conformance.servers.process import die_with_parent
from conformance.servers.process import stop_process as stop

__all__ = ["die_with_parent", "stop", "wait_until"]


def wait_until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> float:
    """Poll CONDITION until it holds, for at most DEADLINE seconds; return the time it took."""
    return process.wait_until(condition, what, deadline, AssertionError)
