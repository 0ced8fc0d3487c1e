"""Training on Ray Train + DeepSpeed: per-worker loop, tasks (classifier, ZoomViT, Zoomer), driver."""
