"""The executor, split by job: the feed and the workers of each mode (feed), what a failure means (policy: its
rules and each server's breaker), acting on it for one request (sender), one server with its slots and its
health (endpoint), the run's numbers (stats) and the one writer of its records (recorder), the concurrency trials
(trials), the truncation guard (guard), and the executor that ties them together (executor)."""
