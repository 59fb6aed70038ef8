"""The executor, split by job: the feed and the gates (gate), the run's numbers (stats), the one writer of the
run's records (recorder), what to do about each failure (policy), one server and its health (endpoint), the
workers of each mode (strategies), the concurrency trials (trials), the truncation guard (guard), and the
executor that ties them together (executor)."""
