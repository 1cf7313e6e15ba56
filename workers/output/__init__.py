"""shardserve.workers.output: token ids -> streamed text (incremental detokenizer, stop strings)."""
