"""Training and tuning: LightGBM on Ray Train, searched with Ray Tune.

    result = platform.training.train({"training_set": "underwriting_v1"})
    best = platform.training.tune({"train": {"training_set": "underwriting_v1"}, "search_space": {...}})

``spec`` holds the YAML-facing specs, ``lightgbm`` the loop each worker runs, ``tune`` the
search, ``api`` the ``Training`` front (``platform.training``). Importing this package loads
neither Ray nor LightGBM.
"""

from mlplatform.training.spec import DEFAULT_PARAMS, Distribution, TrainSpec, TuneSpec

__all__ = ["DEFAULT_PARAMS", "Distribution", "TrainSpec", "TuneSpec"]
