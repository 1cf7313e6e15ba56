"""Prometheus metrics of a shardserve app (vLLM's set under `shardserve:`), and how they flow.

Made where they happen: each LLMServer replica (one engine) keeps its own `ReplicaMetrics`
(replica.py): per finished request the engine's RequestMetrics (TTFT, inter-token latencies,
queue time, end-to-end, tokens, preemptions, cost) with `model`, `replica` and `tenant` labels;
per engine step its time and batch size (the engine thread only appends to a deque); gauges
(running, waiting, KV usage) sampled from `engine.stats()` on scrape and every few seconds.
Exported twice from the same table (names.py): Ray's metrics API (ray_export.py, every Ray node's
metrics agent, as `ray_shardserve_<name>`) and the Ingress's GET /metrics on the HTTP port
(scrape.py), which pulls every replica's prometheus_client families through the DeploymentHandle
and merges them, so one scrape of any Ingress replica shows the whole app. Nothing is counted in the Ingress itself, so several
Ingress replicas never split or double the counts. A replica that is gone takes its series with it
(a counter reset to Prometheus, as when any process restarts).
"""
