"""ZoomViT: Vision Transformers with a visual-intent-guided zoom adapter, as a Ray/DeepSpeed/MLflow pipeline."""

__version__ = "0.1.0"
