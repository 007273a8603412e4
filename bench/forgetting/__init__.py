"""The forgetting benchmark (``python -m bench.forgetting``): see :mod:`bench.forgetting.__main__`."""
