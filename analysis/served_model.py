"""The served model: an MLflow pyfunc written as code (MLflow's "models from code"), which analysis.model_registry
logs and registers; nothing is pickled. MLflow runs this file when the model is loaded or served:

    mlflow models serve -m "models:/pneumonia-cnn@champion" --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d "{\\"dataframe_records\\": [{\\"image\\": \\"$(base64 -w0 chest.png)\\"}]}"

Input, one row per image, what a remote client has: `image`, the file's bytes base64-encoded (PNG, JPEG or DICOM,
told apart by content), or `path`, a file the server itself can read. Output, one row per image: `label`, the
decision at the exported threshold (multi-label: the labels at or above 0.5, joined by "+"), and
`probability_<class>`, each class's calibrated probability. The export folder travels inside the model as its
artifact `export`: the preprocessing, temperature, threshold and an ensemble's members and weights, read by
`analysis.predict.ExportedModel`, so the served model answers exactly as `python -m analysis.predict` does.
The code it runs is medtune's, installed where the model is served (`--env-manager local`, or the image in
`cluster/Dockerfile`).
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from analysis.model_registry import IMAGE, LABEL, PATH, PROBABILITY


class ImageClassifier(PythonModel):
    """An exported medtune model behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from analysis.predict import ExportedModel

        self.model = ExportedModel(context.artifacts["export"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from trainables.errors import UserError

        frame = pd.DataFrame(model_input)
        images = frame[IMAGE] if IMAGE in frame else pd.Series([None] * len(frame))
        paths = frame[PATH] if PATH in frame else pd.Series([None] * len(frame))
        sources = []
        for row, (encoded, path) in enumerate(zip(images, paths)):
            if isinstance(encoded, str) and encoded:
                try:
                    sources.append(base64.b64decode(encoded, validate=True))
                except binascii.Error as error:
                    raise UserError(f"row {row}: `{IMAGE}` is not base64 ({error}); send the file's bytes "
                                    "base64-encoded") from error
            elif isinstance(path, str) and path:
                sources.append(path)
            else:
                raise UserError(f"row {row} has no image: send `{IMAGE}` (the file base64-encoded) or `{PATH}`")
        probs, labels = self.model.predict(sources)
        names = self.model.prep["class_names"]
        out = pd.DataFrame({LABEL: labels})
        for column, name in enumerate(names):
            out[PROBABILITY.format(name)] = probs[:, column]
        return out


mlflow.models.set_model(ImageClassifier())
