"""shardserve.workers.worker: one rank of a worker group, and the executors that drive ranks."""
