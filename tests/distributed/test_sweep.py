"""Sweep engine: round-robin assignment, one atomic file per job, resume without recomputing.

The last two tests run the real ``hqjax sweep`` command in subprocesses: two processes
joined by ``jax.distributed.initialize`` on 127.0.0.1, and a sweep killed part-way and
resumed; both must reproduce the single-process results file exactly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from hqjax import distributed as hd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_make_jobs_order_ids_and_errors():
    jobs = hd.make_jobs(["conv1", "stage1/block0/conv1"], ["trace", "top_eigenvalue"], num_subsets=2)
    assert len(jobs) == 8 and jobs[0] == hd.Job("trace", "conv1", 0) and jobs[-1].subset == 1
    assert jobs[2].id == "trace--stage1.block0.conv1--s0"
    assert len({j.id for j in jobs}) == 8
    with pytest.raises(ValueError, match="collide"):
        hd.make_jobs(["a/b", "a.b"], ["trace"])
    with pytest.raises(ValueError, match="num_subsets"):
        hd.make_jobs(["a"], ["trace"], num_subsets=0)


def test_job_key_depends_on_job_only():
    key = jax.random.key(0)
    a, b = hd.Job("trace", "conv1", 0), hd.Job("trace", "conv1", 1)
    assert (jax.random.key_data(hd.job_key(key, a)) == jax.random.key_data(hd.job_key(key, a))).all()
    assert not (jax.random.key_data(hd.job_key(key, a)) == jax.random.key_data(hd.job_key(key, b))).all()


def _value(job):
    return {"value": len(job.layer) * 10 + job.subset}


def test_round_robin_over_devices_and_results(tmp_path):
    jobs = hd.make_jobs(["a", "bb", "ccc"], ["m"], num_subsets=4)  # 12 jobs
    seen = []

    def compute(job, device):
        seen.append((job.id, device.id))
        return _value(job)

    devices = jax.devices()[:4]
    report = hd.run_sweep(jobs, compute, str(tmp_path), devices=devices)
    assert sorted(report.computed) == sorted(j.id for j in jobs) and report.skipped == ()
    assert sorted(seen) == sorted((j.id, devices[i % 4].id) for i, j in enumerate(jobs))
    merged = json.load(open(report.results_path))
    assert [r["job"] for r in merged["jobs"]] == [j.to_dict() for j in jobs]
    assert [r["result"] for r in merged["jobs"]] == [_value(j) for j in jobs]


def test_resume_skips_finished_and_config_must_match(tmp_path):
    jobs = hd.make_jobs(["a", "bb"], ["m", "n"])
    calls = []

    def failing_after_two(job, device):
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        calls.append(job.id)
        return _value(job)

    with pytest.raises(RuntimeError, match="job 'm--bb--s0' failed on cpu:0: interrupted"):
        hd.run_sweep(jobs, failing_after_two, str(tmp_path), devices=jax.devices()[:1], config={"k": 1})
    files = sorted(os.listdir(tmp_path / "jobs"))
    assert files == sorted(f"{i}.json" for i in calls)  # finished jobs only, no temporary files left
    (tmp_path / "jobs" / ".tmp-stale.json").write_text('{"job": ')  # what a kill mid-write leaves
    with pytest.raises(ValueError, match=r"different configuration.*\['k'\]"):
        hd.run_sweep(jobs, lambda j, d: _value(j), str(tmp_path), devices=jax.devices()[:1], config={"k": 2})
    again = []
    report = hd.run_sweep(jobs, lambda j, d: again.append(j.id) or _value(j), str(tmp_path),
                          devices=jax.devices()[:1], config={"k": 1})
    assert set(report.skipped) == set(calls) and not set(again) & set(calls)
    assert not (tmp_path / "jobs" / ".tmp-stale.json").exists()
    assert sorted(again + calls) == sorted(j.id for j in jobs)
    with pytest.raises(FileNotFoundError, match="no finished result"):
        hd.load_results(str(tmp_path), [*jobs, hd.Job("m", "zzz")])


# --------------------------------------------------------------------------- subprocesses
# One layer, two metrics, three subsets: six jobs but only two distinct compiled estimators.
SWEEP_ARGS = ["--model", "mlp", "--layers", "Dense_1", "--metrics", "top_eigenvalue,trace", "--subsets", "3", "--subset-size", "32",
              "--num-probes", "2", "--max-iters", "5", "--loop", "device"]


def _env(n_devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _sweep(out, cache, n_devices, extra=()):
    cmd = [sys.executable, "-m", "hqjax.distributed.command", "--out", str(out), "--compile-cache", str(cache),
           *SWEEP_ARGS, *extra]
    return subprocess.Popen(cmd, env=_env(n_devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"sweep did not finish in {timeout}s:\n{out}")
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, two local devices: the results every other run must reproduce."""
    root = tmp_path_factory.mktemp("sweep")
    _finish(_sweep(root / "reference", root / "cache", 2))
    return root, (root / "reference" / "results.json").read_bytes()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_produce_the_single_process_results(reference):
    root, expected = reference
    out, port = root / "two_proc", _free_port()
    procs = [_sweep(out, root / "cache", 1, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                             "--process-id", str(i)]) for i in range(2)]
    logs = [_finish(p) for p in procs]
    # Both processes computed jobs (round-robin over the two global devices) ...
    assert all("computed" in log for log in logs), logs
    # ... and the merged file is byte-identical to one process's.
    assert (out / "results.json").read_bytes() == expected


@pytest.mark.slow
def test_killed_sweep_resumes_without_recomputing(reference):
    root, expected = reference
    out = root / "killed"
    proc = _sweep(out, root / "cache", 2)
    jobs_dir, deadline = out / "jobs", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if jobs_dir.is_dir() and any(n.endswith(".json") and not n.startswith(".") for n in os.listdir(jobs_dir)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = {n: (jobs_dir / n).read_bytes() for n in os.listdir(jobs_dir) if not n.startswith(".")}
    stamps = {n: os.stat(jobs_dir / n).st_mtime_ns for n in done}
    assert 0 < len(done) < 6, f"kill came too late or too early: {sorted(done)}"
    assert not (out / "results.json").exists()
    for blob in done.values():  # atomic writes: every file that exists is complete
        assert "result" in json.loads(blob)

    log = _finish(_sweep(out, root / "cache", 2))
    recomputed = {line.split("computed ")[1].split(" on ")[0] + ".json" for line in log.splitlines() if "] computed " in line}
    assert recomputed and not recomputed & set(done), (recomputed, sorted(done))
    assert recomputed | set(done) == {n for n in os.listdir(jobs_dir) if not n.startswith(".")}
    for n, blob in done.items():  # finished files untouched
        assert (jobs_dir / n).read_bytes() == blob and os.stat(jobs_dir / n).st_mtime_ns == stamps[n]
    assert (out / "results.json").read_bytes() == expected


def test_initialize_single_process_is_a_noop_and_partial_multi_process_args_raise():
    hd.initialize()  # one process, no coordinator: nothing to start
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="coordinator_address"):
        hd.initialize(num_processes=2, process_id=0)


def test_sweep_takes_a_user_factory_and_its_orbax_variables(tmp_path):
    """``hqjax sweep --model package.module:factory --variables <Orbax folder>``, as ``hqjax run``
    takes them: variables equal to the factory's initialization give the results of no
    variables, byte for byte; other weights give other traces; variables of another model fail
    in one line."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import hqjax
    import user_models as um
    from hqjax.distributed.command import sweep_main
    from hqjax.train import init_variables

    model, _ = hqjax.from_nnx(um.nnx_cnn())
    init = init_variables(model, jax.random.key(0), (8, 8, 1))
    scaled = jax.tree.map(lambda a: a * 1.5, init)
    for name, v in (("same", init), ("scaled", scaled), ("other", {"params": {"dense": {"kernel": jnp.ones((3, 3))}}})):
        ocp.PyTreeCheckpointer().save(str(tmp_path / f"{name}_ckpt"), v)
    args = ["--model", "user_models:nnx_cnn", "--layers", "head", "--metrics", "trace", "--num-probes", "2",
            "--subset-size", "16", "--loop", "host"]
    results = {}
    for name in ("none", "same", "scaled"):
        extra = [] if name == "none" else ["--variables", str(tmp_path / f"{name}_ckpt")]
        assert sweep_main(["--out", str(tmp_path / name), *args, *extra]) == 0
        results[name] = json.loads((tmp_path / name / "results.json").read_text())["jobs"]
    assert results["same"] == results["none"] and results["scaled"] != results["none"]
    assert sweep_main(["--out", str(tmp_path / "bad"), *args, "--variables", str(tmp_path / "other_ckpt")]) == 2
    assert not (tmp_path / "bad" / "results.json").exists()


def test_sweep_takes_each_layer_of_a_stack(tmp_path):
    """A scanned stack's layers are layers of the sweep (``--layers 'blocks/fc1[1]'``)."""
    from hqjax.distributed.command import sweep_main

    args = ["--model", "user_models:nnx_scan_mlp", "--metrics", "trace", "--num-probes", "2", "--subset-size", "16",
            "--loop", "host", "--quiet"]
    assert sweep_main(["--out", str(tmp_path / "one"), *args, "--layers", "blocks/fc1[1]"]) == 0
    jobs = json.loads((tmp_path / "one" / "results.json").read_text())["jobs"]
    assert [j["job"]["layer"] for j in jobs] == ["blocks/fc1[1]"] and jobs[0]["result"]["trace"] > 0
    assert sweep_main(["--out", str(tmp_path / "bad"), *args, "--layers", "blocks/fc1"]) == 2
