"""Ahead-of-time compilation (`--config.compile_for`): every stage's jitted step compiled for a TPU slice without the
hardware (libtpu's compile-only devices) or for this machine's devices, with the compiler's per-chip memory and cost,
a fit check, and serialized executables a run on the slice can load. targets (what to compile for), compiler
(compile, analyse, save and load one step), steps (the stages' steps, the report, the fit search)."""
