"""CareFL's domain core: data, models, training, privacy, aggregation maths, ledger (no Flower)."""

import os

# torch CPU buffers of 2 MB or more (the (n, d) update matrix, per-sample gradients) go on
# transparent huge pages. First-touch page faults were half the cost of building the 562 MB
# update matrix of 20 DenseNet121 replies: 0.21 s, 0.09 s with huge pages (BENCHMARKS.md).
# torch reads the variable once, at its first large allocation, so it is set when carefl is
# imported, before any model or matrix exists. setdefault keeps an operator's explicit choice,
# e.g. THP_MEM_ALLOC_ENABLE=0. On kernels with THP off the madvise is a no-op.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
