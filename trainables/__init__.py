"""What ONE trial does, grouped by concern: `data/`, `augment/`, `models.py`, `training/` (the loop), and the
lowest layer `tracking/` (names, ranking, state file and MLflow logging that the search and the analysis share).

Only `ray_trainable.py` (the Ray Tune trainable) and `tracking/mlflow_runs.py` (the driver's MLflow callback)
import Ray; nothing here imports `search_spaces`, `analysis` or `tune.py`. A trial runs alone:
`python -m trainables.train --config trial.yaml`.
"""
