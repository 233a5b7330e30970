"""Training: the loop (trainer), checkpoints and resume, callbacks (console, metrics file, MLflow), metrics, the
optimizer and learning-rate schedules."""
