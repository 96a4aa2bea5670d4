"""Register an exported model in the MLflow Model Registry (`analysis.export --register NAME [--alias champion]`).

What is logged is the served model (analysis/served_model.py, an MLflow pyfunc from code) with the export folder
as its artifact, under the winning trial's run: its signature (base64 image bytes or a path in; label and each
class's calibrated probability out) and an input example, a real image of the validation split, go with it. The
new version is tagged with its search and trial and gets the alias (default `champion`), so clients serve
`models:/NAME@champion` and a newer export moves the alias, not the clients.
"""

from __future__ import annotations

import base64
import io
import logging
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from trainables.errors import UserError
from trainables.tracking.names import TAG_SEARCH, TAG_TRIAL_RUN

SERVED_MODEL = Path(__file__).with_name("served_model.py")  # never imported here: MLflow runs it when it loads
ALIAS = "champion"
IMAGE, PATH, LABEL = "image", "path", "label"  # the served model's input and output columns
PROBABILITY = "probability_{}"
# What the served model imports, at the versions of this environment (medtune itself is installed where it is served)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "scipy",
                "scikit-learn", "pydantic", "pydicom")


def png_base64(image: np.ndarray) -> str:
    """An (H, W, C) uint8 image as the base64 text of a PNG file: what a client sends."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE, required=False), ColSpec("string", PATH, required=False)])
    outputs = Schema([ColSpec("string", LABEL), *(ColSpec("double", PROBABILITY.format(n)) for n in class_names)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    found = []
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:  # pydicom: the [export] extra, absent when DICOM is not served
            continue
    return found


def example_image(prep: dict) -> np.ndarray:
    """A mid-grey image of the model's size and channels: the logged input example shows the format without
    carrying a patient's image out with the model."""
    return np.full((prep["image_size"], prep["image_size"], prep["channels"]), 128, np.uint8)


def register(out: Path, prep: dict, tracking_uri: str, trial, search: str, model_name: str, metrics: dict,
             alias: str = ALIAS) -> int:
    """Log the served model for the export folder `out` (its preprocessing `prep`) under the winning trial's run,
    register it as a new version of `model_name`, tag it and point `alias` at it; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    example = pd.DataFrame({IMAGE: [png_base64(example_image(prep))]})
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # its notes on models from code and environment inference
    with warnings.catch_warnings(), mlflow.start_run(run_id=trial.info.run_id):
        warnings.simplefilter("ignore")
        try:
            info = mlflow.pyfunc.log_model(
                name="served_model", python_model=str(SERVED_MODEL), artifacts={"export": str(out)},
                signature=signature(prep["class_names"]), input_example=example, registered_model_name=model_name,
                pip_requirements=requirements(), await_registration_for=60)
        except mlflow.exceptions.MlflowException as error:
            raise UserError(f"Could not register {model_name!r} at {tracking_uri} ({str(error).splitlines()[0][:160]}); "
                            "the Model Registry needs a database-backed store (sqlite:///..., a tracking server)") from error
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in {TAG_SEARCH: search, TAG_TRIAL_RUN: trial.info.run_id,
                       "test_acc": f"{metrics['test']['argmax']['acc']['value']:.4f}",
                       "test_auc": f"{metrics['test']['argmax']['auc']['value']:.4f}"}.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    client.set_registered_model_alias(model_name, alias, str(version))
    return version
