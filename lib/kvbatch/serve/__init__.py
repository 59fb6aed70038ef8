"""Servers: the embedded llama-server (how it is built, started, watched and stopped), the backends that speak
HTTP to any server (only they do), the supervisors that keep a server usable during a run, the memory probes,
and the slot layout a server runs with. Nothing here imports from `measure` or `batch`."""
