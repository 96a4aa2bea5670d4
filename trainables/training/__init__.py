"""The training loop: one split's state stepped an epoch at a time (`split_run`), the one epoch driver for one split
or K folds (`epochs`, `cv`), losses, metrics, checkpoints and the report files a finished trial leaves (`figures`)."""
