"""A JAX without Pallas' Triton backend (deprecated in jax 0.12, to be
removed): structmat still imports, every XLA path and the TPU kernels run,
impl="auto" falls back to XLA on GPUs, impl="pallas" says why it cannot, and
the Mosaic GPU Monarch lowers its forward and gradients without Triton."""
import os
import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the Triton module must be missing before any
# structmat module is imported.
_CHECK = textwrap.dedent("""
    import sys
    sys.modules["jax.experimental.pallas.triton"] = None  # import -> ImportError
    import jax, jax.numpy as jnp
    from structmat import ops
    from structmat.kernels import (blockdiag as bk, dispatch, monarch as mk,
                                   monarch_mgpu, monarch_tpu, sltrain as sk,
                                   triton_backend)
    from tests.helpers import assert_close as close
    assert triton_backend.plt is None

    def refuses(f, *args, **kw):
      try:
        f(*args, **kw)
      except ValueError as e:
        assert "no Pallas Triton backend" in str(e), e
        return str(e)
      raise AssertionError(f"{f} ran without Triton")

    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (32, 64))
    w1 = jax.random.normal(k[1], (2, 32, 32))   # q/l = 16: no padding
    w2 = jax.random.normal(k[2], (2, 32, 32))
    y = ops.monarch_matmul(x, w1, w2)
    close(ops.monarch_matmul(x, w1, w2, impl="auto"), y)
    # Unpadded blocks need no masked loads: interpret mode still runs them.
    close(ops.monarch_matmul(x, w1, w2, impl="pallas"), y)
    # Padded ones (p = 24) do, and say so, naming the way out.
    xp = jax.random.normal(k[3], (32, 96))
    w1p, w2p = jnp.ones((4, 24, 24)), jnp.ones((4, 24, 24))
    msg = refuses(ops.monarch_matmul, xp, w1p, w2p, impl="pallas")
    assert "impl='auto'" in msg, msg
    # The TPU kernel never needed Triton.
    close(monarch_tpu.monarch_matmul_tpu(
        jax.random.normal(k[4], (128, 256)), jnp.ones((2, 128, 128)) / 128,
        jnp.ones((2, 128, 128)) / 128, block_tokens=128),
        ops.monarch_matmul(jax.random.normal(k[4], (128, 256)),
                           jnp.ones((2, 128, 128)) / 128,
                           jnp.ones((2, 128, 128)) / 128))
    # Nor does the Mosaic GPU Monarch (forward, dx, dw1, dw2) for an H100.
    from structmat.kernels.lowering import cross_lower
    text = cross_lower(
        lambda *a: monarch_mgpu.monarch_matmul_mgpu(*a, interpret=False,
                                                    platform="cuda"),
        [jax.ShapeDtypeStruct(s, jnp.bfloat16)
         for s in ((4096, 512), (4, 128, 128), (4, 128, 128))], "cuda",
        (0, 1, 2))
    assert text.count("mosaic_gpu") > 1 and "triton" not in text, text[:300]
    # SLTrain's kernel stores through masks even when interpreted.
    idx = ops.draw_support(k[5], 64, 64, 0.05)
    a, b = jax.random.normal(k[6], (64, 16)), jax.random.normal(k[7], (16, 64))
    v = jnp.ones(idx.shape)
    close(ops.sltrain_matmul(x, a, b, v, idx, 0.5, impl="auto"),
          ops.sltrain_matmul(x, a, b, v, idx, 0.5))
    refuses(ops.sltrain_matmul, x, a, b, v, idx, 0.5, impl="pallas")
    # Compiling for a GPU: every portable kernel refuses, with the reason.
    assert "Triton" in mk.supported(32, w1.shape, w2.shape, 32, "gpu")
    assert "Triton" in bk.supported(32, w1.shape, 32, "gpu")
    assert "Triton" in sk.supported(128, 64, 64, 16, 128, 64, 64, 32, "gpu")
    refuses(bk.blockdiag_matmul_pallas, x, w1, block_tokens=32,
            interpret=False, platform="gpu")
    # ... so impl="auto" on a GPU runs XLA for them.
    jax.default_backend = lambda: "gpu"
    xb = jax.random.normal(k[0], (512, 512), jnp.bfloat16)
    w = jnp.ones((4, 128, 128), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(
        lambda x: dispatch.monarch(x, w, w, None, "auto"))(xb))
    assert "pallas_call" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x: dispatch.blockdiag(x, w, "auto"))(xb))
    assert "pallas_call" not in jaxpr
    # ... and impl="pallas" the Mosaic GPU Monarch on a Hopper GPU, with its
    # gradients; elsewhere the portable kernel's reason.
    pallas = lambda x, a: dispatch.monarch(x, a, a, None, "pallas")
    grad = jax.grad(lambda x, a: jnp.sum(pallas(x, a).astype(jnp.float32)),
                    argnums=(0, 1))
    msg = refuses(jax.make_jaxpr(grad), xb, w)
    assert "Triton" in msg, msg
    monarch_mgpu.hardware_problem = lambda platform: None  # "an H100"
    jaxpr = str(jax.make_jaxpr(grad)(xb, w))
    # four Mosaic GPU kernels: forward, dx, dU, dB
    assert jaxpr.count("grid_names") == 4, jaxpr[:500]
    print("OK")
""")


def test_structmat_without_triton_backend():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True,
                     text=True, timeout=300, env=env,
                     cwd=os.path.dirname(os.path.dirname(__file__)))
  assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (
      p.stdout[-3000:] + p.stderr[-3000:])
