"""The lowest layer: what a search writes down and how every layer reads it back.

MLflow names (`names`), the outcome and ranking rule and metric direction (`ranking`), the search's state file
(`state`), which keys a space searches (`searched`) and the search-time MLflow logging (`mlflow_runs`). It imports
nothing else of medtune but `trainables.errors`, so a trial, the search and the analysis can all rely on it.
"""
