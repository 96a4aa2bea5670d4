"""Register an exported model in the MLflow Model Registry (`analysis.export --register NAME`).

The TorchScript module is logged as an MLflow model under the winning trial's run, with the export's
preprocessing, decision, metrics and card as extra files, and the version is tagged with its search and trial.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from analysis.ensemble_model import ENSEMBLE
from trainables.errors import UserError
from trainables.tracking.names import TAG_SEARCH, TAG_TRIAL_RUN


def register(out: Path, module, tracking_uri: str, trial, search: str, model_name: str, metrics: dict):
    """Log the TorchScript module as an MLflow model under the winning trial's run and register it."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    prep = json.loads((out / "preprocessing.json").read_text())
    example = np.zeros((1, prep["channels"], prep["image_size"], prep["image_size"]), np.float32)
    with torch.no_grad():
        signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
    # mlflow.pytorch warns that "pickle" format can run code on load; a ScriptModule is written by torch.jit.save
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), mlflow.start_run(run_id=trial.info.run_id):
        warnings.simplefilter("ignore")
        try:
            info = mlflow.pytorch.log_model(
                module, name="exported_model", registered_model_name=model_name, signature=signature,
                serialization_format="pickle",  # for a ScriptModule this means torch.jit.save (pt2 is for eager models)
                extra_files=[str(out / f) for f in ("preprocessing.json", "decision.json", "metrics.json", "model_card.md",
                                                    ENSEMBLE) if (out / f).exists()],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], await_registration_for=60)
        except mlflow.exceptions.MlflowException as error:
            raise UserError(f"Could not register {model_name!r} at {tracking_uri} ({str(error).splitlines()[0][:160]}); "
                            "the Model Registry needs a database-backed store (sqlite:///..., a tracking server)") from error
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in {TAG_SEARCH: search, TAG_TRIAL_RUN: trial.info.run_id,
                       "test_acc": f"{metrics['test']['argmax']['acc']['value']:.4f}",
                       "test_auc": f"{metrics['test']['argmax']['auc']['value']:.4f}"}.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return version
