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

from hqjax.distributed.sharding import (
    data_parallel_hessian, data_parallel_loss, make_mesh, replicate, shard_batch,
)
from hqjax.distributed.probes import (
    probe_parallel_density, probe_parallel_trace,
)
from hqjax.distributed.sweep import (
    Job, SweepReport, initialize, job_key, load_results, make_jobs, run_sweep,
)
from hqjax.distributed.command import sweep_main

__all__ = [
    "data_parallel_hessian", "data_parallel_loss", "make_mesh", "replicate", "shard_batch",
    "probe_parallel_density", "probe_parallel_trace", "Job", "SweepReport", "initialize", "job_key",
    "load_results", "make_jobs", "run_sweep", "sweep_main",
]
