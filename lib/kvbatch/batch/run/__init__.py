"""Running a batch: the runner that ties a run together (runner), the append-only journal of results and errors
(journal), the summary written at the end of each invocation (summary), progress, the memory monitor, the Ray
pool, and the executor and its parts (execution/)."""
