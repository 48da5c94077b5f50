"""syncml: synchronization mechanisms in distributed machine learning, run on real MPI engines."""
__version__ = "0.1.0"
