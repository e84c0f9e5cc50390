"""``carefl-predict``: a hospital runs a run's final model (or its own personal model) on new studies.

    carefl-predict outputs/<run-id> /data/new/p1.nii.gz /data/new/p2/ --out predictions/
    carefl-predict outputs/<run-id> t1.nii.gz,t2.nii.gz --out predictions/          # one 2-channel study
    carefl-predict outputs/<run-id> scan.nii.gz --personal /var/lib/carefl/state --out predictions/

Each input is one study: a NIfTI or PNG file, a DICOM file or a DICOM series folder, or several
files joined by commas (channels). It goes through exactly the training pipeline of the run
(:func:`carefl.data.reading.read_image`, the run's preset ``steps``), then:

- segmentation: sliding-window inference at the preprocessed resolution (``data.spatial_size``
  windows, ``data.sw_overlap``), argmax (or sigmoid > 0.5 for one class), the preset's spatial
  steps inverted (MONAI ``Invertd``, nearest neighbour), and the mask written as
  ``<name>_seg.nii.gz`` (MONAI ``SaveImage``) on the input's own voxel grid: same shape and
  affine as the input, labels 0..K-1;
- classification: class probabilities, one CSV row per study in ``<out>/predictions.csv``.

``--explain`` also writes ``<name>_explain.png`` beside them (:mod:`carefl.explain`): occlusion
sensitivity and GradCAM of the predicted class, or the foreground probability and its
flip test-time-augmentation variance, over the preprocessed image (3D: its middle slice).

Before anything runs, the model file is checked: the run's ``model_final.pt`` against the run's
ledger (:func:`carefl.ledger.verify_run`), a personal model against the hospital's own signed
receipt for it (``--personal``: its state dir). A model that does not match is refused. One line
per study as it is done (with the time it took); a study that cannot be read or processed is
reported and skipped; exit status 0 when all were written, 1 when some failed, 2 when nothing
could run (bad run directory, model that does not verify, run not trained on files).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

from carefl.errors import CareFLError, ConfigError, DataError


def load_verified_model(run_dir: Path, personal_state_dir: Path | None):
    """``(cfg, model)`` of a finished run, its weights checked before use (see the module docstring)."""
    from omegaconf import OmegaConf

    from carefl.hospital import PERSONAL_DIR, PERSONAL_SUFFIX
    from carefl.ledger import LedgerError, hash_state_dict, run_id, verify_run
    from carefl.models import build_model
    from carefl.receipts import LOG_FILE, ReceiptLog

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a CareFL run directory (no config.yaml); give outputs/<run-id>")
    cfg = OmegaConf.load(config)
    if cfg.data.name != "decathlon":
        raise ConfigError(f"this run trained on data={cfg.data.name}; carefl-predict runs models trained on "
                          "files (data=decathlon), whose preprocessing it can repeat")
    try:  # the global model is checked against the ledger; a personal one needs only the run's id
        result = verify_run(run_dir) if personal_state_dir is None else None
        run = run_id(run_dir) if personal_state_dir is not None else None
    except LedgerError as err:
        raise ConfigError(f"{run_dir}: {err}") from None
    if result is not None:
        if not result.ok:
            raise ConfigError(f"{run_dir}: the model does not verify against the run's ledger: {result.reason}")
        state = torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True)
    else:
        path = personal_state_dir / PERSONAL_DIR / f"{run}.pt"
        if not path.is_file():
            raise ConfigError(f"no personal model of run {run[:12]} in {personal_state_dir}/{PERSONAL_DIR}; "
                              "it is written after the last round of a run with personalization=finetune, and every round with ditto")
        state = torch.load(path, map_location="cpu", weights_only=True)
        signed = [r["update_hash"] for r in ReceiptLog(personal_state_dir / LOG_FILE).receipts()
                  if r.get("run_id") == run + PERSONAL_SUFFIX]
        if not signed or signed[-1] != hash_state_dict(state):
            raise ConfigError(f"{path} does not match the hospital's signed receipt for it: it was replaced or altered")
    model = build_model(cfg)
    model.load_state_dict(state)
    return cfg, model.eval()


def predict_study(cfg, model, files: list[str], out_dir: Path, steps, explain: bool = False) -> Path | list[float]:
    """Predict one study (``files``: its channels); returns the written mask's path
    (segmentation) or the class probabilities (classification). ``explain``: also write
    ``<name>_explain.png`` (:mod:`carefl.explain`, on the preprocessed image)."""
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd, Resized, SaveImage

    from carefl.data.reading import read_image

    from carefl.data.decathlon import SlidingWindow
    from carefl.explain import classification_maps, save_overlay, segmentation_maps

    task, data = cfg.task, cfg.data
    name = os.path.basename(os.path.normpath(files[0]))
    stem = name.split(".")[0] or "study"
    item = steps({"image": read_image(name, files, int(task.spatial_dims), int(task.in_channels))})
    image = item["image"]
    if task.kind == "classification":
        resized = torch.as_tensor(Resized(["image"], tuple(data.spatial_size))(item)["image"])
        with torch.no_grad():
            probs = torch.softmax(model(resized[None]), dim=1)[0].tolist()
        if explain:
            target = max(range(len(probs)), key=probs.__getitem__)
            save_overlay(resized, classification_maps(model, resized, target), out_dir / f"{stem}_explain.png",
                         f"{name}: class {target} (p={probs[target]:.2f})")
        return probs
    window = SlidingWindow(tuple(data.spatial_size), float(data.sw_overlap), int(data.sw_batch_size))
    with torch.no_grad():
        logits = sliding_window_inference(torch.as_tensor(image)[None], window.roi_size, window.sw_batch_size,
                                          model, overlap=window.overlap)[0]
    if explain:
        save_overlay(torch.as_tensor(image), segmentation_maps(model, torch.as_tensor(image), window,
                                                               int(task.num_classes)),
                     out_dir / f"{stem}_explain.png", f"{name}: foreground probability and flip-TTA variance")
    k = int(task.num_classes)
    mask = (torch.sigmoid(logits) > 0.5).float() if k == 1 else logits.argmax(dim=0, keepdim=True).float()
    item["pred"] = MetaTensor(mask, meta=image.meta, applied_operations=image.applied_operations)
    restored = Invertd(keys="pred", transform=steps, orig_keys="image", nearest_interp=True)(item)["pred"]
    restored.meta["filename_or_obj"] = stem
    SaveImage(output_dir=str(out_dir), output_postfix="seg", output_ext=".nii.gz", separate_folder=False,
              resample=False, output_dtype="uint8", print_log=False)(restored)
    return out_dir / f"{stem}_seg.nii.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carefl-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (outputs/<run-id>)")
    parser.add_argument("inputs", nargs="+", help="studies: a file, a DICOM series folder, or comma-joined channels")
    parser.add_argument("--out", type=Path, required=True, help="folder for masks / predictions.csv")
    parser.add_argument("--explain", action="store_true",
                        help="also write <name>_explain.png: occlusion + GradCAM (classification), foreground "
                             "probability + flip-TTA uncertainty (segmentation)")
    parser.add_argument("--personal", type=Path, default=None,
                        help="use this hospital's personal model: its state dir (personalization=finetune or ditto)")
    args = parser.parse_args(argv)
    try:
        cfg, model = load_verified_model(args.run_dir, args.personal)
        from carefl.data.presets import build_transforms, load_preset

        steps, _ = build_transforms(load_preset(cfg.data.preprocess))
    except CareFLError as err:
        print(f"carefl-predict: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    which = f"personal model of {args.personal}" if args.personal else "final federated model"
    print(f"carefl-predict: {len(args.inputs)} stud{'y' if len(args.inputs) == 1 else 'ies'} with the {which} "
          f"(verified) of {args.run_dir}")
    rows, failed = [], 0
    for i, study in enumerate(args.inputs, 1):
        files, start = [f for f in study.split(",") if f], time.perf_counter()
        try:
            result = predict_study(cfg, model, files, args.out, steps, args.explain)
        except (DataError, RuntimeError, ValueError) as err:  # an unreadable or unprocessable study
            failed += 1
            print(f"[{i}/{len(args.inputs)}] {study}: FAILED: {str(err).strip().splitlines()[-1][:300]}")
            continue
        took = time.perf_counter() - start
        if isinstance(result, Path):
            print(f"[{i}/{len(args.inputs)}] {study} -> {result} ({took:.1f} s)")
        else:
            rows.append([study, *[f"{p:.6f}" for p in result], max(range(len(result)), key=result.__getitem__)])
            print(f"[{i}/{len(args.inputs)}] {study}: class {rows[-1][-1]} ({took:.1f} s)")
    if rows:
        with open(args.out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["study", *[f"p_{c}" for c in range(len(rows[0]) - 2)], "predicted"])
            writer.writerows(rows)
        print(f"probabilities written to {args.out / 'predictions.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
