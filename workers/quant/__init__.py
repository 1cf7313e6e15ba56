"""shardserve.workers.quant"""
