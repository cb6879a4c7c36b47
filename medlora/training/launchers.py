"""Study jobs beyond one process: ``medlora crossval --launcher ray`` (Ray tasks, the engine Flower's simulation
runs on) and, with no code here, scheduler arrays (``scripts/slurm_array.sh``, one ``--only`` job per task).

Every unit of the study (a job, or a pack of jobs with ``--pack``) becomes one Ray task that runs the very function
a local worker process runs (:func:`medlora.training.packing.run_unit`: the job's lock, its folder, its summary), so
the files and numbers are those of a local run with the same CPU threads per job. The driver prepares the run
folder (data, folds, pretraining) before submitting anything, prints one line per job as tasks finish, and builds
the report at the end, exactly as the local launcher.

* Without ``--ray-address`` a local Ray is started with ``--workers`` CPUs (one task per CPU; each job uses the
  driver's CPU threads divided by ``--workers``, as ``--workers`` does locally) and shut down at the end.
  Its workers import medlora from where the driver does (``PYTHONPATH`` in the tasks' runtime environment).
* With ``--ray-address`` (``auto``, ``ray://head:10001``) the tasks go to that cluster: medlora must be installed
  on its nodes, and the run folder (``--out``) and config must be at the same path on a filesystem every node
  shares. Each task asks Ray for one CPU and runs one torch thread per CPU it was given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import MedloraError


def _ray_unit(config_path: str, out_dir: str, indices: list[int], threads: int) -> list[tuple[int, Any]]:
    """One unit of the study inside a Ray worker: ``(job index, outcome)`` per job, as a local worker returns."""
    from .crossval import Study
    from .packing import run_unit

    torch.set_num_threads(threads)
    study = Study(config_path, out_dir)
    study.prepare_data()
    jobs = [study.jobs[i] for i in indices]
    return [(i, outcome) for i, (_, outcome) in zip(indices, run_unit(study, jobs), strict=True)]


def run_on_ray(study: Any, units: list[list[Any]], workers: int, address: str | None,
               finished: Callable[[Any, Any], None]) -> None:
    """Run every unit as a Ray task; ``finished(job, outcome)`` for each job as its task returns."""
    try:
        import ray
    except ImportError:
        raise MedloraError("--launcher ray needs Ray: pip install 'medlora[ray]'") from None
    if not units:
        return
    if address is None:
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))
        threads = max(1, torch.get_num_threads() // workers)
        # Ray lowers its workers' priority (nice 15) by default; the local launcher's jobs take the priority
        # of the command, as --workers processes do (on a busy machine they would otherwise wait behind everything)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}})
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        threads = 1
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_unit)
        args = (str(study.config_path.resolve()), str(study.out.resolve()))
        pending = [task.remote(*args, [study.jobs.index(j) for j in unit], threads) for unit in units]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    results = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    # the job's own error (one line at the CLI), not Ray's remote traceback
                    raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from None
                for index, outcome in results:
                    finished(study.jobs[index], outcome)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()
