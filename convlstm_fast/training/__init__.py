"""Training, evaluation, data and figures for :class:`convlstm_fast.models.GestureNet`.

- :mod:`.synthetic` — embedded procedural gesture dataset (no download).
- :mod:`.datasets` — Jester and IsoGD loaders with the reference preprocessing.
- :mod:`.checkpoint` — atomic safetensors + JSON checkpoints.
- :mod:`.distributed` — DistributedDataParallel plumbing (torchrun, gloo/nccl).
- :mod:`.train` — ``python -m convlstm_fast.train`` / ``convlstm-train``.
- :mod:`.evaluate` — ``python -m convlstm_fast.evaluate``: top-1 and a confusion matrix.
- :mod:`.visualize` — ``python -m convlstm_fast.visualize``: Fig. 3 and attention maps.
- :mod:`.curves` — training-curve PNGs from metrics.json files.

Nothing is imported here, so ``import convlstm_fast`` stays light.
"""
