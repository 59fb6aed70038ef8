"""Measurements: the architecture's prediction of the KV cache (kvmodel), the experiments that load a model at
many contexts and fit what they see (experiments), the safe-context search and sustained load, the notebook
steps that run them (steps), and the result file the planner reads (result). Uses `serve`; never `batch`."""
