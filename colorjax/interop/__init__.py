"""The original CoLoR-Filter/OLMo code's artifacts: OLMo checkpoints in and out (olmo, olmo_config, olmo_weights,
torch_files) and dolma token files, score shards and selections (dolma, dolma_common, dolma_export, dolma_scores).

Imports: the stages' libraries (artifacts, data, model, training) and score, select, export.
"""
