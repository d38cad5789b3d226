"""Result types of the curvature estimators: small frozen pytrees that serialize to JSON.

Array fields are pytree children (so a result can leave ``jax.jit`` and cross ``vmap``);
names and counts that shape the computation are static (``pytree_node=False``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from flax import struct

__all__ = ["TraceResult", "LayerTraceResult", "EigenResult", "DensityResult", "result_from_dict"]


def _to_plain(x: Any) -> Any:
    """Arrays -> nested lists, tuples -> lists, so ``json.dumps`` accepts the value."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(x).tolist()
    if isinstance(x, (tuple, list)):
        return [_to_plain(y) for y in x]
    if isinstance(x, dict):
        return {str(k): _to_plain(v) for k, v in x.items()}
    return x


class _Serializable:
    """``to_dict`` / ``to_json`` / ``from_dict`` shared by every result."""

    def to_dict(self) -> dict[str, Any]:
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    def to_json(self, **kwargs) -> str:
        """``to_dict()`` as JSON text with the schema stamp (``hqjax._schema``)."""
        from hqjax._schema import stamp

        return json.dumps(stamp("curvature_result", self.to_dict()), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        kw = {}
        for f in dataclasses.fields(cls):
            v = d[f.name]
            if f.metadata.get("pytree_node", True):
                v = jax.tree.map(np.asarray, v, is_leaf=lambda x: isinstance(x, list))
            elif isinstance(v, list):
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)


@struct.dataclass
class TraceResult(_Serializable):
    """A stochastic trace estimate, total and per block, from the same probes.

    Attributes
    ----------
    total : estimate of ``tr(M)``.
    total_stderr : its standard error (sample standard deviation / sqrt(num_probes); for
        Hutch++ the error of the stochastic part only, the low-rank part being exact).
    block_traces : ``[num_blocks]`` estimates of ``tr(M_bb)`` (``E[v_b . (M v)_b]``).
    block_stderr : ``[num_blocks]`` standard errors. From one pass they include every
        cross-block term and are large on coupled layers; compare them with
        ``block_traces`` before use (see :func:`hqjax.layer_traces`).
    num_probes : number of probes that entered the estimate (an array: under a tolerance
        stop it is only known at run time).
    block_names : static tuple of block names, aligned with ``block_traces``.
    method : ``'hutchinson'`` or ``'hutch++'``.
    """

    total: Any
    total_stderr: Any
    block_traces: Any
    block_stderr: Any
    num_probes: Any
    block_names: tuple[str, ...] = struct.field(pytree_node=False, default=())
    method: str = struct.field(pytree_node=False, default="hutchinson")

    def per_block(self) -> dict[str, tuple[float, float]]:
        """``{block name: (trace, stderr)}`` as Python floats."""
        t, s = np.asarray(self.block_traces), np.asarray(self.block_stderr)
        return {n: (float(t[i]), float(s[i])) for i, n in enumerate(self.block_names)}


@struct.dataclass
class LayerTraceResult(_Serializable):
    """Per-layer traces ``tr(M_bb)``, each layer estimated (or computed) on its own.

    Attributes
    ----------
    traces : ``[num_layers]`` trace of each layer's diagonal block.
    stderr : ``[num_layers]`` standard errors (0 for exact methods such as the Gauss-Newton
        trace of :func:`hqjax.curvature.ggn_layer_traces`).
    num_probes : ``[num_layers]`` probes (or, for exact and per-example methods, label
        samples or passes) spent on each layer.
    block_names : static tuple of layer names, aligned with the arrays.
    method : how the numbers were obtained: ``'hutchinson'`` (per-layer probes),
        ``'deflated'`` (one pass, top eigenvectors exact), ``'exact'``, ``'per_example'``,
        ``'monte_carlo'``.
    curvature : which matrix: ``'hessian'``, ``'ggn'``, ``'empirical_fisher'`` or ``'fisher'``.
    """

    traces: Any
    stderr: Any
    num_probes: Any
    block_names: tuple[str, ...] = struct.field(pytree_node=False, default=())
    method: str = struct.field(pytree_node=False, default="hutchinson")
    curvature: str = struct.field(pytree_node=False, default="hessian")

    def per_block(self) -> dict[str, tuple[float, float]]:
        """``{layer name: (trace, stderr)}`` as Python floats (what ``hqjax.sensitivity_table`` reads)."""
        t, s = np.asarray(self.traces), np.asarray(self.stderr)
        return {n: (float(t[i]), float(s[i])) for i, n in enumerate(self.block_names)}

    def relative_stderr(self) -> Any:
        """``stderr / |traces|`` per layer (inf where a trace is 0)."""
        t = np.abs(np.asarray(self.traces, np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(t > 0, np.asarray(self.stderr, np.float64) / t, np.inf)


@struct.dataclass
class EigenResult(_Serializable):
    """Top eigenpairs of a symmetric operator.

    Attributes
    ----------
    eigenvalues : ``[k]``, sorted by decreasing magnitude.
    eigenvectors : pytree shaped like the params with a leading axis ``k``; unit norm.
    num_iters : ``[k]`` matvecs spent on each eigenpair (power) or the Lanczos steps taken,
        repeated.
    method : ``'power'`` or ``'lanczos'``.
    converged : ``[k]`` booleans: the eigenvalue met the tolerance before the iteration limit
        (``None`` in results written before this field existed).
    """

    eigenvalues: Any
    eigenvectors: Any
    num_iters: Any
    method: str = struct.field(pytree_node=False, default="power")
    converged: Any = None

    def to_dict(self) -> dict[str, Any]:
        # Eigenvectors are as large as the model: JSON keeps the values, not the vectors.
        return {"type": "EigenResult", "eigenvalues": _to_plain(self.eigenvalues),
                "num_iters": _to_plain(self.num_iters), "method": self.method,
                "converged": _to_plain(self.converged)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        conv = d.get("converged")
        return cls(np.asarray(d["eigenvalues"]), None, np.asarray(d["num_iters"]), d.get("method", "power"),
                   None if conv is None else np.asarray(conv, bool))


@struct.dataclass
class DensityResult(_Serializable):
    """Stochastic Lanczos quadrature of a spectrum (Ghorbani et al. 2019; PyHessian Sec. 3).

    The spectral density is ``phi(t) = mean_runs sum_i weights[r, i] delta(t - nodes[r, i])``.

    Attributes
    ----------
    nodes : ``[num_runs, num_steps]`` Ritz values (eigenvalues of the Lanczos tridiagonal).
    weights : ``[num_runs, num_steps]`` squared first components of its eigenvectors; each
        run's weights sum to 1.
    """

    nodes: Any
    weights: Any

    @property
    def num_runs(self) -> int:
        return int(np.shape(self.nodes)[0])

    def moment(self, p: int) -> Any:
        """Quadrature estimate of ``tr(M^p) / n`` averaged over runs."""
        import jax.numpy as jnp

        return jnp.mean(jnp.sum(self.weights * self.nodes**p, axis=-1))


_TYPES = {c.__name__: c for c in (TraceResult, LayerTraceResult, EigenResult, DensityResult)}


def result_from_dict(d: dict[str, Any]):
    """Rebuild any curvature result from its ``to_dict()`` (or parsed ``to_json()``, whose
    schema stamp is checked)."""
    from hqjax._schema import unstamp

    d = unstamp(d, "curvature_result", "the curvature result")
    try:
        return _TYPES[d["type"]].from_dict(d)
    except KeyError:
        raise ValueError(f"not a curvature result: type {d.get('type')!r}; known: {sorted(_TYPES)}") from None
