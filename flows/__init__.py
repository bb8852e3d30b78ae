"""Prefect flows: they compose stages, decide what to skip, and hand MLflow run ids down. No model math here."""
