"""The application: the `mnistq` command line (cli), `mnistq run` (run, supervisor, embedded
Redis, the run-state file it writes), `mnistq watch`/`classify` (watch) and `mnistq predict`."""
