"""shardserve.parallel"""
