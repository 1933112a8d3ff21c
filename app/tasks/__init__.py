"""Task prompts and post-processing over the one engine: sentiment (scoring), translation, summaries."""
