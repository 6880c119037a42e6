"""The compatibility matrix: many servers' conformance reports on one static page.

``merge`` combines reports into one document, ``interop`` scores the spec's
Baseline and Maximum interoperability sets, ``render`` writes the HTML,
``runner`` runs the suite per server and ``cli`` is ``nbd-conformance matrix``.
"""
