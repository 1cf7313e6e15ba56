"""shardserve.workers.scheduler"""
