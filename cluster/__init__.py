"""shardserve.cluster"""
