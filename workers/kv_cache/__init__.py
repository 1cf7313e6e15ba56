"""shardserve.workers.kv_cache"""
