"""structmat: structured matrices for JAX (Monarch, BTT, PHM, SLTrain, NOLA, ...)."""
__version__ = "0.1.0"
