"""Pipeline stages: plain functions `run(config, inputs, out_dir, tracker) -> StageResult`. No Prefect here."""
