"""What ONE trial does: data, models, augmentation, losses, metrics and the train loop.

Only `ray_trainable.py` imports Ray; nothing imports MLflow, `tune.py` or `analysis`. A trial runs alone:
`python -m trainables.train --config trial.yaml`.
"""
