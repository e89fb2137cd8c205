"""`encode --engine ray`: the same rows, skips and codes as `encode_folder`, on Ray Data.

    result = encode_ray("photos/", "codes.parquet", runner, "model.onnx", backend="ort-cpu")

* The driver scans and stats the folder exactly as `encode_folder` does (same exclusions, same
  skip reasons), takes the same output lock, and writes through the same `write_codes`.
* Ray Data runs two stages over the relative paths: read and decode each file with
  `images.decode_batch` (the project's decode, not Ray's `read_images`, whose conversions differ
  from training), then an actor pool of runners (`make_runner`, any backend). Ray fuses the two
  into the actors, so each actor decodes the batches it encodes. Ray Data does not
  keep row order, so every row carries its path (as bytes: a Linux name need not be UTF-8), and
  the driver puts the rows back in scan order.
* Every (path, code or reason) row is gathered on the driver before writing: memory there grows
  with the folder (about 0.2 KB a file), as in `encode_folder`.
* Without `address` a local Ray is started in-process on this machine's cores; actors and decode
  tasks each reserve half a CPU, because whole-CPU actors on 2 cores leave no CPU for the decode
  tasks that feed them and the pipeline waits forever, silently. With `address` ("auto",
  "ray://...") the images must be readable at the same path on every node.
* `resume=True` keeps the rows of an existing output (`.npy` or `.parquet`) whose files are still
  there and encodes only the others. The output holds no size or mtime, so a file changed in
  place since keeps its old code; skipped files are tried again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dsah_rt.atomic import output_lock
from dsah_rt.codes import read_codes, write_codes
from dsah_rt.encode import EncodeError, EncodeResult, Progress, check_paths, collect_rows, model_record, scan_inputs, stat_files
from dsah_rt.errors import UserError, display_path
from dsah_rt.images import MAX_PIXELS, decode_batch

if TYPE_CHECKING:
    from dsah_rt.runners.base import Runner

# Half a CPU for each actor and decode task: see the module docstring.
CPU_SHARE = 0.5


def _decode(batch: dict[str, np.ndarray], root: str, size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: decoded images of a batch of paths, a zero image and the reason for each skipped file."""
    rels = [os.fsdecode(p) for p in batch["path"]]
    decoded, reasons = decode_batch(root, rels, size, max_pixels)
    images = np.zeros((len(rels), 3, size, size), np.uint8)
    ok = np.array([r is None for r in reasons], bool)
    images[ok] = decoded
    return {"path": batch["path"], "image": images, "reason": np.array([r or "" for r in reasons], object)}


class _Encoder:
    """Ray actor: one runner for its lifetime; codes of the decoded rows, zeros where a reason is set."""

    def __init__(self, model_path: str, backend: str, threads: int | None) -> None:
        from dsah_rt.runners import make_runner

        self.runner = make_runner(model_path, backend, threads=threads)
        # Each worker records what ran it: with --backend auto a GPU node picks another backend than the driver.
        self.model = json.dumps(model_record(self.runner), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["reason"] == ""
        codes = np.zeros((len(ok), self.runner.info.nbytes), np.uint8)
        if ok.any():
            codes[ok] = self.runner.infer(np.ascontiguousarray(batch["image"][ok]))
        return {"path": batch["path"], "code": codes, "reason": batch["reason"], "model": np.full(len(ok), self.model, object)}


def _start_ray(address: str | None) -> bool:
    """Connect to `address`, or start a local Ray when none runs yet; True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    return True


def _pool_size(workers: int | None, gpus_per_worker: float) -> int:
    """Actors in the pool: `workers`, else one per GPU share or per CPU the cluster has."""
    import ray

    if workers is not None:
        return workers
    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) / gpus_per_worker))
    return max(1, int(resources.get("CPU", 1)))


def _reused(out: Path, stats: dict[str, list[int]], runner: Runner, log: Callable[[str], None]) -> dict[str, list[Any]]:
    """Entries ([size, mtime, code hex, None]) of the rows of an existing `out` whose files are still scanned."""
    if not out.exists():
        log("nothing to resume: no earlier output found, encoding from the start")
        return {}
    earlier = read_codes(out)
    if earlier.fingerprint != runner.info.fingerprint or earlier.bits != runner.info.bits:
        raise EncodeError(f"{out}: was encoded by another model; rerun without --resume")
    kept = {
        rel: [*stats[rel], code.tobytes().hex(), None]
        for rel, code in zip(earlier.rows or (), earlier.packed) if rel in stats
    }  # fmt: skip
    log(f"resuming: {len(kept)} files already in {out.name}")
    return kept


def encode_ray(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    runner: Runner,
    model_path: str | os.PathLike[str],
    backend: str = "auto",
    threads: int | None = 1,
    batch: int = 32,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    address: str | None = None,
    resume: bool = False,
    strict: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
    max_pixels: int = MAX_PIXELS,
) -> EncodeResult:
    """Encode every image under `images` on Ray Data into `out`; see the module docstring.

    `runner` is the driver's own (its model info, and the manifest's model when no image reaches a
    worker); each worker runs `make_runner(model_path, backend, threads)`, on `gpus_per_worker`
    GPUs if set. Raises what `encode_folder` raises, in the same cases.
    """
    start = time.perf_counter()
    source, out_path = check_paths(images, out, batch)
    assert out_path is not None
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be at least 0, got {gpus_per_worker}")
    import ray

    with output_lock(out_path):
        root, found = scan_inputs(source, out_path)
        stats, skipped = stat_files(root, found.files)
        entries = _reused(out_path, stats, runner, log) if resume else {}
        reused = len(entries)
        todo = [rel for rel in stats if rel not in entries]
        started = _start_ray(address)
        try:
            models = _run(ray, root, todo, stats, entries, runner, str(model_path), backend, threads, batch,
                          _pool_size(workers, gpus_per_worker), gpus_per_worker, max_pixels, progress)  # fmt: skip
        finally:
            if started:
                ray.shutdown()
        lost = [rel for rel in todo if rel not in entries]
        if lost:
            raise EncodeError(f"{display_path(lost[0])}: {len(lost)} files came back from no worker; nothing written")
        if len(models) > 1:
            raise EncodeError(f"{out_path}: workers ran the model on different backends ({', '.join(sorted(models))}); pass --backend")
        model = json.loads(models.pop()) if models else model_record(runner)
        rows, packed, skipped = collect_rows(stats, entries, [*found.skipped, *skipped], runner.info.nbytes, strict)
        write_codes(out_path, packed, runner.info.bits, rows, [s.as_dict() for s in skipped], model)
    return EncodeResult(out_path, rows, packed, skipped, len(todo), reused, time.perf_counter() - start, runner.describe())


def _run(
    ray: Any, root: Path, todo: list[str], stats: dict[str, list[int]], entries: dict[str, list[Any]], runner: Runner,
    model_path: str, backend: str, threads: int | None, batch: int, pool: int, gpus: float, max_pixels: int,
    progress: Progress | None,
) -> set[str]:  # fmt: skip
    """Run the pipeline over `todo`, recording each file's entry; the workers' model records."""
    if progress:
        progress(len(entries), len(stats))
    if not todo:
        return set()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI draws its own bar from `progress`
    context.print_on_execution_start = False
    blocks = min(max(1, -(-len(todo) // batch)), 4096)
    ds = ray.data.from_items([{"path": os.fsencode(rel)} for rel in todo], override_num_blocks=blocks)
    ds = ds.map_batches(
        _decode, batch_size=batch, batch_format="numpy", num_cpus=CPU_SHARE,
        fn_kwargs={"root": str(root), "size": runner.info.input_size, "max_pixels": max_pixels},
    )  # fmt: skip
    ds = ds.map_batches(
        _Encoder, batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=CPU_SHARE, num_gpus=gpus or None,
        fn_constructor_kwargs={"model_path": model_path, "backend": backend, "threads": threads},
    )  # fmt: skip
    models: set[str] = set()
    try:
        for part in ds.iter_batches(batch_format="numpy", batch_size=None):
            for path, code, reason in zip(part["path"], part["code"], part["reason"]):
                rel = os.fsdecode(path)
                entries[rel] = [*stats[rel], None, reason] if reason else [*stats[rel], code.tobytes().hex(), None]
            models.update(part["model"])
            if progress:
                progress(len(entries), len(stats))
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):  # a model that does not start on a worker: its one line
            raise cause from None
        raise
    return models
