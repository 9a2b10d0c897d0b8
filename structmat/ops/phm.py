"""Parameterized hypercomplex multiplication (PHM; Zhang et al. 2021, Compacter).

H = sum_i kron(A_i, B_i) with the "rule" A (n, n, n) and B (n, in/n, out/n); H is
laid out (in, out) so y = x H. Compacter factorizes B_i = s_i t_i (rank r):
s (n, in/n, r), t (n, r, out/n).
"""
import jax.numpy as jnp


def phm_kernel(rule, w):
  """Materialize H = sum_i kron(rule[i], w[i]).

  Args:
    rule: (n, n, n).
    w: (n, in/n, out/n) full slices, or a pair (s, t) of factors
      (n, in/n, r) and (n, r, out/n).

  Returns:
    (in, out) kernel, H[a*(in/n) + b, c*(out/n) + d] = sum_i rule[i,a,c] w[i,b,d].
  """
  if isinstance(w, (tuple, list)):
    w = jnp.einsum("ibr,ird->ibd", *w)
  n, a_in, a_out = rule.shape
  _, bi, bo = w.shape
  return jnp.einsum("iac,ibd->abcd", rule, w).reshape(a_in * bi, a_out * bo)


def phm_matmul(x, rule, w):
  """y = x H without building H.

  Full slices cost in*out MACs per token (PHM saves parameters, not FLOPs);
  factorized slices cost n*r*(in + out) + n^3 r.

  Args:
    x: (..., in).
    rule: (n, n, n).
    w: (n, in/n, out/n), or (s, t) factors (n, in/n, r), (n, r, out/n).

  Returns:
    (..., out).
  """
  n = rule.shape[0]
  xs = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)      # [..., a, b]
  if isinstance(w, (tuple, list)):
    s, t = w
    u = jnp.einsum("...ab,ibr->...iar", xs, s)             # [..., i, a, r]
    u = jnp.einsum("...iar,iac->...icr", u, rule)          # [..., i, c, r]
    y = jnp.einsum("...icr,ird->...cd", u, t)
  else:
    u = jnp.einsum("...ab,iac->...icb", xs, rule)          # [..., i, c, b]
    y = jnp.einsum("...icb,ibd->...cd", u, w)
  return y.reshape(*x.shape[:-1], -1)
