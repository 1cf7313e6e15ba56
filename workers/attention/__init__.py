"""shardserve.workers.attention"""
