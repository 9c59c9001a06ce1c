"""The report stage: a pipeline work directory's results (results), its setup table (setup), compute accounting
(compute), report.md (markdown) and plots.

Imports: errors, console, methods, artifacts, data, model, training.metrics, score, select.
"""
