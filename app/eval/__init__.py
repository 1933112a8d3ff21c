"""Quality measurements: the task endpoints scored on public data over HTTP (`textgen eval`), perplexity, and the
choice of each task's prompts by cross-validation. Run by the CLI; nothing in the server imports this package."""
