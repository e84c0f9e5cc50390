"""The names a config value may take, for the checks in :mod:`carefl.config`.

They live here, apart from the code that builds what they name (which imports torch, MONAI and
Opacus: about 2 s), so that a bad override is answered before any of that is imported. Each
builder takes its names from here, so every name is defined once.
"""

SEGMENTATION, CLASSIFICATION = "segmentation", "classification"
#: ``task.kind``
TASK_KINDS = (SEGMENTATION, CLASSIFICATION)
#: ``task.loss`` per task kind (:func:`carefl.tasks.build_loss` builds them)
LOSSES = {SEGMENTATION: ("dice", "dice_ce"), CLASSIFICATION: ("ce",)}
#: ``model.name`` -> the task kind its net solves (:mod:`carefl.models` builds them)
NET_KINDS = {"unet": SEGMENTATION, "basicunet": SEGMENTATION,
             "densenet121": CLASSIFICATION, "classifier": CLASSIFICATION}
#: ``privacy.accountant`` (Opacus accountants)
ACCOUNTANTS = ("prv", "rdp")
#: ``privacy.grad_sample_mode``: Opacus per-sample gradient modes that train all our nets.
#: benchmarks/bench_dp.py: "ew" (ExpandedWeights) fails on PReLU, ConvTranspose and DenseNet's
#: strided views; "ghost" needs a per-sample loss of shape (N,) and is slower for conv nets.
#: "bk" is CareFL's book-keeping engine (carefl.dp_bk): exact clipping, one backward.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "bk")
