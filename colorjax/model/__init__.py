"""The model: the OLMo-style transformer (transformer), the one owner of the loss mask, per-sequence NLL and
CoLoR score (losses), and the dry run's size, FLOP and memory arithmetic (estimate).

Imports: errors, sharding (logical axis names only).
"""
