"""Selections: the artifact every selection stage writes (artifact.py: sorted ids of a pool store and their
manifest; the exact streamed top-k; seeded uniform draws) and the interface every selection stage offers the
pipeline (stage.py)."""
