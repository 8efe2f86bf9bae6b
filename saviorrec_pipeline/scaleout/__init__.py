"""The heavy stages on Ray, for when one machine is not enough: the same Polars and PyTorch
recipes as in-process, run per shard by Ray tasks, Ray Data and Ray Train. A stage's result on Ray
equals its in-process result (the data stages exactly; training within a stated tolerance).
Nothing here knows of Dagster; the `Compute` resource picks these or the in-process recipes."""
