"""Pallas kernels with custom VJPs; their XLA references live in structmat.ops."""
from structmat.kernels.blockdiag import blockdiag_matmul_pallas, supported
