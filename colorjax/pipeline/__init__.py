"""The pipeline stage: every step's stage config and the run of them in one work directory (runner), and the
preflight that checks every artifact's lineage and every setting before any work (preflight).

Imports: every stage module and the libraries below them; nothing imports it but main.
"""
