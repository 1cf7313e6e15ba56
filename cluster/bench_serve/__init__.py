"""`shardserve bench serve`: online load against OpenAI-compatible HTTP endpoints or our gRPC API.

Data flow: options.py parses the flags into `ServeBenchOptions` (endpoints, load points, dataset,
SLO); dataset.py builds the requests once (seeded, the same for every endpoint and load point);
for each load point and endpoint, runner.py sends them on the schedule of arrivals.py through one
of clients.py's streaming clients, which time every request (`RequestRecord`); summary.py turns
the records into percentiles, throughput and goodput; report.py prints the table and writes the
JSON; plots.py (matplotlib, imported only when plots are written) draws all endpoints on one set
of axes. Nothing here imports Ray or torch: it is a client, and runs anywhere the package does.
"""
