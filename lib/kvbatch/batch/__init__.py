"""Batches: input formats and validation (batchio), token counts (tokens), the plan (plan), the run folder
(runfolder) and its journal (journal), the executor and its parts, the memory monitor, the runner that ties them
together, and synthetic samples. Uses `measure` and `serve`."""
