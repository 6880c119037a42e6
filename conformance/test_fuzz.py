"""Network-level fuzzing: malformed and random traffic, then the server still serves, data intact.

Each check runs a campaign (:mod:`conformance.fuzzing.campaign`): it writes a
known pattern through a well-behaved client, opens many fresh connections
and sends malformed traffic at one stage of the protocol, and finally proves
that a new well-behaved client is served and the pattern reads back unchanged
(also every ``PROBE_EVERY`` cases, so that a failure names a short window of
cases).

* greeting (:mod:`conformance.fuzzing.greeting`): random bytes before and
  instead of the client flags;
* options (:mod:`conformance.fuzzing.options`): structure-aware mutations of a
  valid option haggling (flipped bits in magics, option numbers and lengths,
  truncated and extended payloads, absurd lengths, duplicated and cut-off
  options);
* requests (:mod:`conformance.fuzzing.requests`): after a valid NBD_OPT_GO,
  requests with random types, flags, lengths and offsets, bad magics, huge
  lengths, abrupt disconnects in the middle of a write payload.

Bounded: ``CASES`` per check and ``BUDGET`` seconds (whichever comes first).
Deterministic: the seed is ``NBD_FUZZ_SEED`` (decimal or 0x-hex) or a fixed
default, and it is printed; rerun a failure with the seed its message shows.
The crashes these campaigns found are replayed deterministically by
test_fuzz_regressions.py.
"""

from __future__ import annotations

import pytest

from conformance.fuzzing.campaign import Campaign
from conformance.fuzzing.greeting import run_greeting_case
from conformance.fuzzing.options import run_options_case
from conformance.fuzzing.requests import negotiates_extended_headers, run_requests_case
from conformance.spec import MUST, spec

# Fuzzing may crash or wedge the server: against a server the suite did not
# start it runs only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

CASES = {"greeting": 60, "options": 120, "requests": 120}


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
)
@pytest.mark.writes
def test_fuzzed_greetings_leave_the_server_serving_and_the_data_intact(server):
    """Random bytes in place of, around and after the client flags, on fresh connections: each
    connection may be dropped, but the server goes on serving others and loses no data."""
    campaign = Campaign(server, "greeting")
    campaign.write_pattern()
    campaign.run(CASES["greeting"], lambda rng: run_greeting_case(server, rng))


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
)
@pytest.mark.writes
def test_fuzzed_option_haggling_leaves_the_server_serving_and_the_data_intact(server):
    """Valid option haggling with flipped bits in magics, option numbers and lengths, truncated
    and extended payloads, absurd lengths, duplicated options and cut-off streams: the server
    errors or drops that connection only."""
    campaign = Campaign(server, "options")
    campaign.write_pattern()
    campaign.run(CASES["options"], lambda rng: run_options_case(server, rng))


@spec(
    "Protocol phases / Transmission / Terminating the transmission phase",
    MUST,
)
@pytest.mark.writes
def test_fuzzed_requests_leave_the_server_serving_and_the_data_intact(server):
    """After a valid NBD_OPT_GO: requests with random types, flags, offsets and lengths, bad
    magics, huge lengths and writes cut off mid-payload.  None of them addresses the pattern
    (a server that lets offset + length wrap around 2^64 would); the pattern stays intact and
    the server keeps serving."""
    campaign = Campaign(server, "requests")
    size = campaign.write_pattern()
    can_extend = negotiates_extended_headers(server)
    campaign.run(CASES["requests"], lambda rng: run_requests_case(server, rng, size, can_extend))
