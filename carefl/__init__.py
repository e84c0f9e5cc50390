"""CareFL's domain core: data, models, training, privacy, aggregation maths, ledger (no Flower)."""

import os

# torch CPU buffers of 2 MB or more (the (n, d) update matrix, per-sample gradients) go on
# transparent huge pages. First-touch page faults were half the cost of building the 562 MB
# update matrix of 20 DenseNet121 replies: 0.21 s, 0.09 s with huge pages (BENCHMARKS.md).
# torch reads the variable once, at its first large allocation, so it is set when carefl is
# imported, before any model or matrix exists. setdefault keeps an operator's explicit choice,
# e.g. THP_MEM_ALLOC_ENABLE=0. On kernels with THP off the madvise is a no-op.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import logging
import sys
import warnings

# Third-party warnings that tell a CareFL user nothing they can act on, filtered once, here:
# every CareFL process (ServerApp, ClientApp, carefl-sim, the CLIs) imports this package first.
# - Opacus "Secure RNG turned off": CareFL draws Poisson sampling and noise from OS entropy
#   itself and says what that guarantees (carefl.privacy, "Randomness the server cannot predict");
# - torch "Full backward hook is firing ... no inputs require gradients": Opacus' per-sample
#   hooks on the first layer, whose input is the image;
# - Opacus RDP "Optimal order is the largest alpha": the RDP bound is only ever a cross-check;
# - Opacus "First batch is empty": an empty Poisson batch is a real event that
#   carefl.training.train_epochs turns into a noise-only step, as the accountant counts it;
# - SQLAlchemy "The ``noload`` loader strategy is deprecated": MLflow's SQLite store
#   (tracking=mlflow), about MLflow's own code;
# - torch "Using a non-tuple sequence for multidimensional indexing": MONAI's occlusion
#   sensitivity and Gaussian kernels (the explanation gallery, carefl-predict --explain), about
#   MONAI's own code.
for _message in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the largest alpha",
                 "The ``noload`` loader strategy is deprecated",
                 "Using a non-tuple sequence for multidimensional indexing"):
    warnings.filterwarnings("ignore", message=f".*{_message}")
logging.getLogger("opacus.data_loader").addFilter(lambda record: "First batch is empty" not in record.getMessage())


def console_logging() -> logging.Logger:
    """The ``carefl`` logger printing INFO lines to this process's stdout (once per process):
    the ServerApp's round lines, a hospital's training progress and refusals on its console."""
    log = logging.getLogger("carefl")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s carefl %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
