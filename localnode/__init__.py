"""Starting and stopping the node's processes (Prefect server, worker, listener...) for the demo,
the benchmark and the tests."""
