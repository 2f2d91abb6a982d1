"""Tensor parallelism: one model split across N worker processes, one per device.

A model served with ``--tensor-parallel-size N`` runs in N worker processes
(``worker.py``), under one engine process that schedules and stands where the model
runner stands for one device (``executor.py``, talking to the workers over ``channel.py``).
Worker ``rank`` holds the ``rank``-th of N equal parts of every partitioned dimension,
Megatron's split:

* q, k and v (and gate and up) are **column-parallel**: the worker computes its attention
  heads' (its intermediate columns') outputs from the whole hidden state, no communication;
* o and down are **row-parallel**: the worker multiplies its heads' (its columns') part of
  the input, and one all-reduce sums the N partial outputs (the bias is added once);
* the embeddings and the head are split along the vocabulary, ceil(vocab / N) rows each (the
  last part padded with zero rows): each worker looks up the ids in its range (an all-reduce
  puts the rows together), and computes its range of the logits (an all-gather puts them
  side by side, and the padding's columns are dropped).

The KV cache follows the heads: a worker's pool pages hold its KV heads only, so a page is
``num_kv_heads / N · head_dim`` wide on each worker, and a page id means the same token (or
the same adapter row) on every worker.

LoRA follows S-LoRA's partition (``lora.py``): every adapter matrix is split along both its
input and its output with the base layer, so each worker holds 1/N of it. ``sharding.py``
cuts the weights; ``group.py`` names a worker's part and runs the collectives.

This package's ``__init__`` imports nothing: ``engine.model`` imports ``group`` alone.
"""
