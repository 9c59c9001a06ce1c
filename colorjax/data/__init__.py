"""Data: token stores and their order (stores), tokenizers, text files, the pipeline's corpus split, the
synthetic demo corpus, the multiple-choice tasks and their SFT rows.

Imports: errors, console, config, artifacts.
"""
