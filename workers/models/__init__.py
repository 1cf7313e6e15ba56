"""shardserve.workers.models"""
