"""Kiln: the model side and shared infrastructure (config, models, objectives, samplers, checkpoints, tracking).

The numerical core (models, text_encoder, vae, flow, sampler) imports neither Prefect nor MLflow.
"""

__version__ = "0.1.0"
