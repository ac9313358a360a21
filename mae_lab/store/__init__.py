"""The experiment database: tables, queue, reads, Optuna storage, per-trial records."""
