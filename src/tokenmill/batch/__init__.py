"""Durable batch jobs: OpenAI's Files and Batches API over SQLite (store), validated up front (validate),
run line by line through the server's own handlers (execute) by a resumable job loop (worker)."""
