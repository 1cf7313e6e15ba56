"""shardserve.workers.eval"""
