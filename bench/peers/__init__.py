"""The peers: other ways to fan a token stream out over WebSockets, run on
the same machine, with the same workload, by the same load generator.

Each module runs one server process under uvicorn (``python -m
bench.peers.<name> --port P [--redis URL]``); the benchmark starts two of
each on one Redis, as it starts two durable-chat pods. Their code uses only
the peers' published packages (and bench.peers.common for the workload).
"""
