"""From a trained model to per-frame predictions.

- `windows`: the one windowed predict-and-stitch path (validation,
  `--mode=evaluate`, `--mode=predict`), window identity carried through the
  devices, multi-process-safe global batches.
- `trial`: whole-trial inference (each frame once), built on `windows`.
"""
