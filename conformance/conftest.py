"""Makes ``pytest conformance --nbd-server=...`` load the suite's plugin."""

pytest_plugins = ["conformance.plugin"]
