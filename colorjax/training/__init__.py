"""Training runs: batch and step planning (step_plan), the run folder and its request (run_folder), checkpoints and
params exports (checkpoint), metrics.jsonl and its mirrors (metrics), preemption, and RHO-down's online selection (rho).

Imports: errors, console, sharding, artifacts, data, model.
"""
