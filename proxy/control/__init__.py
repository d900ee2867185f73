"""The process around the data plane: wiring and lifecycle, admin API, /status, metrics, reload, workers."""
