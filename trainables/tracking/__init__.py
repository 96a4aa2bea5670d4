"""The lowest layer: what a search writes down and how every layer reads it back.

MLflow names (`names`), the outcome and ranking rule and metric direction (`ranking`), the search's state file and
its queue of MLflow calls (`state`), which keys a space searches (`searched`), the search-time MLflow logging
(`mlflow_runs`) and the client that outlives a tracking server going away (`resilient`). It imports
nothing else of medtune but `trainables.errors`, so a trial, the search and the analysis can all rely on it.
"""
