"""shardserve.workers.kernels"""
