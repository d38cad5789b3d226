"""Curvature over many devices and hosts: meshes, sharded operators, resumable sweeps.

Three ways to spread Hessian work, all with JAX's own SPMD machinery:

* **data parallel** (:mod:`.sharding`) -- the batch is sharded over a mesh axis and every
  Hessian-vector product is the exact dataset-level HVP;
* **probe parallel** (:mod:`.probes`) -- Hutchinson probes and SLQ runs are split over a
  mesh axis, so more devices mean fewer probes each;
* **job parallel** (:mod:`.sweep`) -- per-layer jobs (layer x data subset x metric) are
  dealt round-robin over every device of every host, one atomically written file per
  finished job, so an interrupted sweep resumes where it stopped; :func:`sweep_main` is the
  ``hqjax sweep`` command.

Multi-host start-up is one process per host calling :func:`initialize` (a thin wrapper of
``jax.distributed.initialize``) before anything else touches devices; see the README.
"""

from hqjax.distributed.sharding import *  # noqa: F401,F403
from hqjax.distributed.sharding import __all__ as _sharding_all
from hqjax.distributed.probes import *  # noqa: F401,F403
from hqjax.distributed.probes import __all__ as _probes_all
from hqjax.distributed.sweep import *  # noqa: F401,F403
from hqjax.distributed.sweep import __all__ as _sweep_all

from hqjax.distributed.command import sweep_main

__all__ = [*_sharding_all, *_probes_all, *_sweep_all, "sweep_main"]
