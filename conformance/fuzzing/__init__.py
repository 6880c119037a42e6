"""The fuzzer behind conformance/test_fuzz.py: a campaign runner and one case generator per stage.

``campaign`` runs the cases and probes the server; ``greeting``, ``options``
and ``requests`` make the fuzzed traffic of each stage of the protocol.
"""
