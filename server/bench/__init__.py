"""The data side of ``loraserve bench``: seeded request lists and the latency arithmetic.

``workloads`` generates the request lists of docs/benchmarks.md (W2: S-LoRA's synthetic
serving, W3: Punica's closed loop, W4: adapter churn) and saves them to disk so every system
replays the same list; ``metrics`` turns per-request timings into the numbers ``vllm bench
serve`` prints. Neither talks to a server.
"""
