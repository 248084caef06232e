"""``--executor ray``: the samples of a sweep run as Ray tasks on actors that each load the model once.

Ray is optional (``pip install ray``; not a kvsqueeze dependency). The driver builds the samples, keeps the
resume bookkeeping and appends every row to ``results.jsonl`` itself, so rows stay atomic and ``--resume`` works
exactly as with the local executor. The unit of work is one sample with its pending cells (they share one
prefill). Workers load the model on the sweep's ``--device``: for ``cuda``/``cuda:N`` (or ``auto`` on a cluster
with GPUs) one per GPU of the cluster (each actor asks for a GPU), else ``KVSQUEEZE_RAY_WORKERS`` (default 1) CPU
actors. ``ray.init()`` connects to ``RAY_ADDRESS`` when set, else starts a local Ray.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.validation import check_count


def default_factory(model: str | None, dtype: str, device: str = "auto"):
    """The provider a worker loads the model with, on the sweep's ``--device`` (``auto``: CUDA when the worker
    has one)."""
    from kvsqueeze.bench.runner import ModelProvider

    return ModelProvider(model, dtype, device=device)


WORKERS_ENV = "KVSQUEEZE_RAY_WORKERS"


def cpu_workers() -> int:
    """CPU actors of a sweep that does not run on GPUs: ``KVSQUEEZE_RAY_WORKERS`` (unset or empty: 1), a whole
    number >= 1."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if not text:
        return 1
    fix = f" (Ray workers); set e.g. {WORKERS_ENV}=4, or unset it for one"
    return check_count(int(text) if text.isdigit() else text, WORKERS_ENV, fix)


def wants_gpu(device: str, cluster_gpus: int) -> bool:
    """Whether a worker on ``device`` asks Ray for a GPU (``cuda``/``cuda:N``, or ``auto`` on a cluster with GPUs)."""
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


class RayExecutor:
    name = "ray"

    def __init__(
        self,
        provider_factory: Callable[[], object] | None = None,
        num_workers: int | None = None,
        init_kwargs: dict | None = None,
    ):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise KVSqueezeError(
                "--executor ray needs the 'ray' extra: pip install 'kvsqueeze[ray]' (or use --executor local)"
            ) from None
        self.provider_factory = provider_factory
        self.num_workers = None if num_workers is None else check_count(num_workers, "num_workers (Ray workers)")
        self.cpu_workers = cpu_workers()  # checked here: before the sweep loads anything
        self.init_kwargs = init_kwargs or {}

    def run(self, jobs, config, provider, on_row) -> None:
        import ray
        from ray.util import ActorPool

        from kvsqueeze.bench.runner import environment, open_store, run_job

        if not ray.is_initialized():
            try:
                ray.init(ignore_reinit_error=True, log_to_driver=False, **self.init_kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError … (an address it cannot use)
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise KVSqueezeError(
                    f"cannot start or reach Ray ({type(exc).__name__}: {first}); check RAY_ADDRESS (unset it for a "
                    "local Ray) or use --executor local"
                ) from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = getattr(config, "device", "auto") or "auto"
        gpu = wants_gpu(device, gpus)
        if gpu and device != "auto" and not gpus:
            raise KVSqueezeError(f"--device {device} with --executor ray: the Ray cluster has no GPU; use --device cpu")
        workers = self.num_workers or (gpus if gpu else 0) or self.cpu_workers
        factory = self.provider_factory or (lambda: default_factory(config.model, config.dtype, device))
        env = environment()

        @ray.remote(num_gpus=1 if gpu else 0)
        class Worker:
            def __init__(self):
                self.provider = factory()
                self.store = None

            def run(self, job):
                p = self.provider
                if job.sample.kind == "rag" and self.store is None:  # --store: one store shared by every worker
                    self.store = open_store(config)
                return list(run_job(job, config, p.model, p.tokenizer, env, self.store))

        pool = ActorPool([Worker.remote() for _ in range(max(1, min(workers, len(jobs))))])
        for rows in pool.map_unordered(lambda actor, job: actor.run.remote(job), jobs):
            for row in rows:
                on_row(row)
