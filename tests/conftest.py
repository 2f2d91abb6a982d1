"""Suite-wide setup.

* Triton kernels run under the interpreter when no GPU is present.
* One torch thread: the models here are tiny, so every op is dispatch-bound, and on a
  2-core machine shared with other work a second OpenMP thread mostly waits to be scheduled
  (measured: a churn test took 55 s with two threads under load, 9 s with one).
"""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
