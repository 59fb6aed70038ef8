"""Batches: inputs and their validation (requests, openai_batch, table), token sizes (tokens, sizes), the memory
model and the plan (memory, plan, plan_record), the servers of a run (endpoints, prepare, ray_pool), the run folder
(runfolder) and its journal, the executor and its parts (execution/), the memory monitor, the runner that ties them
together (settings, runner, summary), and synthetic samples. Uses `measure` and `serve`."""
