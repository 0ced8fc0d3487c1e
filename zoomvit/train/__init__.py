"""Training on Ray Train + DeepSpeed: each training stage's recipe (``recipes.py``), the specs of what a
worker builds (``task_specs.py``), what each task optimises and reports (``objectives.py``), the driver
(``trainer.py``) and the per-worker loop (``loop.py``)."""
