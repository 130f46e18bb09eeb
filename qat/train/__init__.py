"""Training: the run config schema, the lifecycle's builders, the LightningModule, telemetry,
optimizer groups, LR schedules, strategies, checkpoints and the run record (results.json)."""
