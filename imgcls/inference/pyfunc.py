"""An imgcls checkpoint as an MLflow pyfunc model, logged by ``imgcls.registry`` as
MLflow's "models from code": this file is saved with the model and run when it loads.

``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` then labels the image files (local
or fsspec URIs) of a frame's ``path`` column with imgcls's own inference pipeline, in
the loading process (``pipeline.predict_here``): one row per file, as ``imgcls predict``
writes them. The checkpoint folder is the model's artifact ``checkpoint``.
"""

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

CHECKPOINT_ARTIFACT = "checkpoint"  # the model's artifact: the checkpoint folder (imgcls.registry logs it)


class CheckpointModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.checkpoint = context.artifacts[CHECKPOINT_ARTIFACT]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from imgcls.inference.pipeline import predict_here

        return predict_here([str(p) for p in model_input["path"]], self.checkpoint).to_pandas()


set_model(CheckpointModel())
