"""Resumable per-layer sweeps dealt round-robin over every device of every host.

A sweep is a list of jobs (layer x data subset x metric: HAWQ-V1's per-layer top
eigenvalue, HAWQ-V2's per-layer trace, Q-BERT's per-subset eigenvalues). Each finished job
is written to its own file atomically, so a sweep killed at any point resumes without
recomputing finished jobs and never leaves a half-written result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
import threading
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax

from hqjax._schema import stamp, unstamp

__all__ = ["Job", "make_jobs", "job_key", "SweepReport", "run_sweep", "load_results", "initialize"]

@dataclasses.dataclass(frozen=True, order=True)
class Job:
    """One unit of a sweep: a ``metric`` of one ``layer`` (block name) on one data ``subset``.

    HAWQ-V1 sweeps ``metric='top_eigenvalue'`` over layers, HAWQ-V2 ``'trace'``, and Q-BERT
    repeats the top eigenvalue over data subsets to measure its spread.
    """

    metric: str
    layer: str
    subset: int = 0

    @property
    def id(self) -> str:
        """File-name-safe identifier, unique within a sweep (``'trace--stage1.block0.conv1--s0'``)."""
        return f"{self.metric}--{self.layer.replace('/', '.')}--s{self.subset}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_jobs(layers: Sequence[str], metrics: Sequence[str], num_subsets: int = 1) -> tuple[Job, ...]:
    """All ``subset x layer x metric`` jobs, in that (deterministic) order."""
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}")
    if not layers or not metrics:
        raise ValueError(f"a sweep needs at least one layer and one metric, got layers={list(layers)}, metrics={list(metrics)}")
    jobs = tuple(Job(m, l, s) for s in range(num_subsets) for l in layers for m in metrics)
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"job ids collide (layer names that differ only by '/' vs '.'?): {dup[:3]}")
    return jobs


def job_key(key: jax.Array, job: Job) -> jax.Array:
    """The job's own PRNG key: depends on the job alone, never on which device or host runs it."""
    return jax.random.fold_in(key, zlib.crc32(job.id.encode()) & 0x7FFFFFFF)


def _write_json_atomic(path: str, obj: Any) -> None:
    # Write to a temporary file in the same directory, then rename: readers (and a resumed
    # sweep) see either no file or the whole file, never a half-written one.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json")
    if isinstance(obj, dict):  # versioned output (hqjax._schema)
        in_jobs = os.path.basename(os.path.dirname(path)) == "jobs"
        obj = stamp("sweep_job" if in_jobs else "sweep_" + os.path.splitext(os.path.basename(path))[0], obj)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_job_file(path: str, job: Job) -> dict | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get("job") == job.to_dict() else None


@dataclasses.dataclass(frozen=True)
class SweepReport:
    """What one process did in :func:`run_sweep` (host-side bookkeeping, JSON-serializable).

    Attributes
    ----------
    computed : ids of the jobs this process computed now.
    skipped : ids of this process's jobs already finished on disk (not recomputed).
    results_path : the merged results file (written by process 0 once every job is done).
    """

    computed: tuple[str, ...]
    skipped: tuple[str, ...]
    results_path: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_barrier_calls = itertools.count()  # barrier ids must be unique per call and agree across processes


# JAX versions [from, to) whose private coordination client _barrier may use.
_BARRIER_JAX = ((0, 5), (0, 11))


def _barrier(name: str, timeout_s: float) -> None:
    """Wait until every process gets here.

    Uses the coordination service's key-value barrier (what JAX's own checkpointing uses),
    not a device collective: processes may reach it minutes apart, and the CPU collectives
    (gloo) give up after 30 s.
    """
    if jax.process_count() == 1:
        return
    client = None
    # JAX has no public API for the coordination service's barrier (README, "Architecture"):
    # the private client is used only on the JAX versions it was tested with.
    if _BARRIER_JAX[0] <= tuple(jax.__version_info__[:2]) < _BARRIER_JAX[1]:
        try:
            from jax._src import distributed

            client = distributed.global_state.client
        except (ImportError, AttributeError):  # moved after all: the collective below still works
            client = None
    if client is None:  # initialized by other means: fall back to a device collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"{name}_{next(_barrier_calls)}", timeout_in_ms=int(timeout_s * 1000))


def _check_config(out_dir: str, config: Mapping[str, Any]) -> None:
    path = os.path.join(out_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = unstamp(json.load(f), "sweep_config", repr(path))
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(
                f"{out_dir!r} holds a sweep with a different configuration (differs in {diff}); "
                f"resume with the same settings or choose a new output directory"
            )
    elif jax.process_index() == 0:
        _write_json_atomic(path, dict(config))


def run_sweep(jobs: Sequence[Job], compute: Callable[[Job, jax.Device], Mapping[str, Any]], out_dir: str, *,
              devices: Sequence[jax.Device] | None = None, config: Mapping[str, Any] | None = None,
              log: Callable[[str], None] | None = None, barrier_timeout_s: float = 24 * 3600) -> SweepReport:
    """Run ``jobs`` round-robin over ``devices`` of all processes, one result file per job.

    Job ``i`` belongs to ``devices[i % len(devices)]``; each process runs the jobs of its own
    devices, one host thread per device. A finished job is written atomically to
    ``out_dir/jobs/<job.id>.json``; jobs whose file already exists are skipped, so a sweep
    killed at any point resumes without recomputing finished jobs. When all processes are
    done, process 0 merges the job files into ``out_dir/results.json`` (timings and device
    names, which differ between runs, stay in the job files' ``meta``).

    Parameters
    ----------
    jobs : the sweep, e.g. from :func:`make_jobs`; every process must pass the same list.
    compute : ``compute(job, device) -> {name: JSON value}``; it must run on ``device`` (commit
        its inputs there) and return host values. Use :func:`job_key` for its randomness.
    out_dir : a directory every process can write (a shared file system across hosts).
    devices : default ``jax.devices()``, every device of every process.
    config : JSON-serializable settings recorded in ``out_dir/config.json``; resuming with
        different settings raises.
    log : called with one line per job (e.g. ``print``).
    barrier_timeout_s : how long a process that has finished waits for the others.
    """
    devices = list(jax.devices() if devices is None else devices)
    jobs = list(jobs)
    job_dir = os.path.join(out_dir, "jobs")
    os.makedirs(job_dir, exist_ok=True)
    config = dict(config or {})
    _check_config(out_dir, config)
    me = jax.process_index()
    if jax.process_count() == 1:  # leftovers of a killed run; with several processes one may be writing
        for name in os.listdir(job_dir):
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(job_dir, name))
    queues: dict[jax.Device, list[Job]] = {d: [] for d in devices if d.process_index == me}
    for i, job in enumerate(jobs):
        dev = devices[i % len(devices)]
        if dev.process_index == me:
            queues[dev].append(job)

    computed, skipped, errors = [], [], []
    lock = threading.Lock()

    def worker(dev: jax.Device, queue: list[Job]) -> None:
        for job in queue:
            path = os.path.join(job_dir, job.id + ".json")
            if _read_job_file(path, job) is not None:
                with lock:
                    skipped.append(job.id)
                continue
            start = time.perf_counter()
            try:
                with jax.default_device(dev):
                    result = dict(compute(job, dev))
            except Exception as e:
                raise RuntimeError(f"sweep job {job.id!r} failed on {dev}: {e}") from e
            meta = {"device": str(dev), "process": me, "seconds": time.perf_counter() - start}
            _write_json_atomic(path, {"job": job.to_dict(), "result": result, "meta": meta})
            with lock:
                computed.append(job.id)
                if log:
                    log(f"computed {job.id} on {dev} in {meta['seconds']:.2f}s")

    def guarded(dev, queue):
        try:
            worker(dev, queue)
        except BaseException as e:  # re-raised in the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(d, q), daemon=True) for d, q in queues.items() if q]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    _barrier("hqjax_sweep_jobs_done", barrier_timeout_s)
    results_path = os.path.join(out_dir, "results.json")
    if me == 0:
        merged = load_results(out_dir, jobs)
        _write_json_atomic(results_path, {"config": config, "jobs": merged})
    _barrier("hqjax_sweep_merged", barrier_timeout_s)
    return SweepReport(tuple(computed), tuple(skipped), results_path)


def load_results(out_dir: str, jobs: Sequence[Job] | None = None) -> list[dict]:
    """The finished jobs' ``{'job': ..., 'result': ...}`` records in job order.

    With ``jobs``, every one must be finished (a missing one raises, naming it); without,
    whatever job files exist are returned sorted by id.
    """
    job_dir = os.path.join(out_dir, "jobs")
    if jobs is None:
        names = sorted(n for n in os.listdir(job_dir) if n.endswith(".json") and not n.startswith("."))
        records = []
        for n in names:
            with open(os.path.join(job_dir, n)) as f:
                r = json.load(f)
            records.append({"job": r["job"], "result": r["result"]})
        return records
    records = []
    for job in jobs:
        r = _read_job_file(os.path.join(job_dir, job.id + ".json"), job)
        if r is None:
            raise FileNotFoundError(f"job {job.id!r} has no finished result in {job_dir!r}; run (or resume) the sweep")
        records.append({"job": r["job"], "result": r["result"]})
    return records


# ----------------------------------------------------------------------------- multi-host
def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> None:
    """Start this process's part of a multi-process JAX program (one process per host).

    A thin wrapper of ``jax.distributed.initialize``; call it first, before any other JAX
    call. ``auto=True`` lets JAX detect the cluster (Cloud TPU pods, SLURM, Open MPI);
    otherwise give process 0's ``host:port``, the number of processes and this process's
    id. Without a coordinator and with at most one process it does nothing, so the same
    script runs on one CPU, on several local devices and on a cluster.
    """
    if auto:
        jax.distributed.initialize()
        return
    if coordinator_address is None and (num_processes or 1) == 1:
        return
    if not (coordinator_address and num_processes and process_id is not None):
        raise ValueError(
            f"a multi-process start needs coordinator_address ('host:port' of process 0), num_processes and "
            f"process_id; got {coordinator_address!r}, {num_processes!r}, {process_id!r}"
        )
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
