"""Pure functions: the reference (XLA) semantics of every structure."""
from structmat.ops.blockdiag import blockdiag_matmul, blockdiag_to_dense
from structmat.ops.lowrank import lowrank_matmul, lowrank_project
from structmat.ops.monarch import (monarch_matmul, monarch_matmul_dense,
                                   monarch_project, monarch_shapes,
                                   monarch_to_dense)
from structmat.ops.nola import combine_bases
from structmat.ops.phm import phm_kernel, phm_matmul
from structmat.ops.sltrain_blocked import (sltrain_matmul_blocked,
                                          sltrain_matmul_blocked_of)
from structmat.ops.sparse_lowrank import (draw_support, sltrain_kernel,
                                          sltrain_matmul, sparse_to_dense)
