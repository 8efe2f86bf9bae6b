"""The SaviorRec method in plain Polars and PyTorch: nothing here knows about Dagster."""
