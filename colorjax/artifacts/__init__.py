"""Artifacts on disk and in object storage: their formats and manifests (formats), content ids, the
reuse-or-refuse rule, publishing and locks (lineage), and gs:// / s3:// mirrors (object_storage).

Imports: errors, console. Nothing here imports a stage, a model or data code.
"""
