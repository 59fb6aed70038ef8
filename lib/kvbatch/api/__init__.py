"""The OpenAI Batch API served locally and durably (`kvbatch api`): files and batches in SQLite (store), the HTTP
endpoints the official SDK calls (app), one batch at a time through the same runner as `kvbatch run` (worker), a
status page (page) and signed webhooks (webhooks). Uses `batch` and `report`; nothing below uses it."""
