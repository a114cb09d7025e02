"""The inbox pipeline: watcher, intake, dispatch, finish and the results CSV. Never imports torch.
The Python API is the ``api`` package; the HTML report the ``report`` package."""
