"""What the user gives, validated before anything runs, and its sizes: a request and its fields (requests), the
OpenAI Batch file (openai_batch) or a table with a template (table), synthetic samples (sample), the answer
contract a request's `response_format` sets (answers), token counts from the model's own tokenizer (tokens) and
the size profile the plan reads (sizes), and the servers named (endpoints: `--url`, an endpoints file, and
`backend_for` one of them)."""
