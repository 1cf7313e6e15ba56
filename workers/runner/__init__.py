"""shardserve.workers.runner"""
