"""``loraserve bench``: loraserve's own throughput and latency benchmarks.

The data side: ``workload`` is a seeded request list as data (saved to disk so every run
replays the same list), ``generators`` draws the lists of docs/benchmarks.md (W2: S-LoRA's
synthetic serving, W3: Punica's closed loop, W4: adapter churn, the shared-prefix list), and
``metrics`` turns per-request timings into the numbers ``vllm bench serve`` prints. The
comparisons with the Hugging Face baselines are scripts in ``benchmarks/``, not installed.
"""
