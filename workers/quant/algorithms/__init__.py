"""shardserve.workers.quant.algorithms: how float weights become quantized ones (RTN, GPTQ, AWQ)."""
