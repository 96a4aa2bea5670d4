"""What ONE trial does: data, models, augmentation, losses, metrics and the train loop.

Nothing here imports Ray, MLflow, `tune.py` or `analysis`: a trial runs alone with
`python -m trainables.train --config trial.yaml`.
"""
