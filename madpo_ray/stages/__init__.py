"""One module per pipeline stage; each exposes a `train_loop_per_worker(config)` or a Ray Data UDF."""
