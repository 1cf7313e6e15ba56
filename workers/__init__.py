"""shardserve.workers"""
