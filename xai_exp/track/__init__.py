"""Tracking: the MLflow run of a job (retries, lost servers, heartbeat) and the masking of
secrets wherever they would be printed, logged or stored.

May import: the shared modules and MLflow/Hydra. No explanation code.
"""
