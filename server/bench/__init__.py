"""The data side of ``loraserve bench``: seeded request lists and the latency arithmetic.

``workloads`` generates the request lists of BENCHMARKS.md (W2 synthetic serving, W3 closed
loop, W4 adapter churn) and saves them to disk so every system replays the same list;
``metrics`` turns per-request timings into the numbers ``vllm bench serve`` prints. Neither
talks to a server.
"""
