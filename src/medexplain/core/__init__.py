"""The bottom layer: helpers every other package uses, importing nothing from medexplain.

- :mod:`.spatial`: 2D/3D operators (conv, pooling, norms, resize, Gaussian blur);
- :mod:`.jacobian`: the Jacobian determinant of a displacement field;
- :mod:`.perturb`: baselines (one validator, :func:`~.perturb.check_baseline`), masks,
  pixel ranks;
- :mod:`.scores`: targets, class scores, the one prediction rule, the one chunking helper;
- :mod:`.model`: :func:`~.model.model_guard`, the model's device, seeded generators and noise;
- :mod:`.ranks`: average ranks, rank AUROC, Spearman;
- :mod:`.serialise`: :func:`~.serialise.json_safe`;
- :mod:`.errors`: :func:`~.errors.one_line`;
- :mod:`.progress`: the progress bar with ETA.
"""
