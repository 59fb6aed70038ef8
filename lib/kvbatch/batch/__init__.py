"""Batches, by their three jobs, each in a package of its own that owns it: `inputs` (what the user gives and its
sizes), `plan` (what the server will hold and why), `run` (the run folder's journal, the executor, the summary).
`settings` (what one invocation decides) and `runfolder` (every file of a run folder, named once) lie beneath all
three. Imports run inputs < plan < run. Uses `measure` and `serve`."""
