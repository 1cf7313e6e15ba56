"""shardserve.workers.sampling"""
