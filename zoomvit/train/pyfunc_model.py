"""A stage's trained model as MLflow "models from code": this file is the model's code, its weights are
``model.safetensors`` and its architecture a validated task spec (``spec.json``); nothing is pickled.
Logged by :func:`zoomvit.pipeline.records.log_stage_model`; MLflow runs this file to load it.

Input: uint8 images ``(B, H, W, 3)``, as decoded. For a ZoomViT with ``zoom_source: highres`` the images
are the 2x copies: the model's own input is resized down from them and zoomed cells read their pixels.
Output: float32 logits ``(B, num_classes)`` (the Zoomer: scores ``(B, grid_h, grid_w)``).
"""

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class StageModel(PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from pydantic import TypeAdapter

        from zoomvit.train.objectives import load_trained
        from zoomvit.train.task_specs import TaskSpec

        spec = TypeAdapter(TaskSpec).validate_json(Path(context.artifacts["spec"]).read_text())
        self.mean, self.std = spec.mean, spec.std
        self.highres = getattr(spec, "zoom_source", None) == "highres"
        self.model = load_trained(spec, context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from zoomvit.train.data import to_model_input

        images_BHWC = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.uint8)))
        x_BCHW = to_model_input(images_BHWC, self.mean, self.std)
        with torch.no_grad():
            if self.highres:
                small = F.interpolate(x_BCHW, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
                out = self.model(small, highres=x_BCHW)
            else:
                out = self.model(x_BCHW)
        return out.float().numpy()


set_model(StageModel())
