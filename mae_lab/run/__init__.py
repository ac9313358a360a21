"""Running studies: the runner, workers, search, several processes, provenance, exports."""
