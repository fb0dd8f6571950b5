"""Batch inference as a Ray Data pipeline; builds the predictions Dataset, writes nothing.

Stages: input rows (``path``) -> ``decode.ReadDecodeBatch``
(read bytes, decode, eval-preset geometry; failures become error rows) ->
``model_stage.Classifier`` (normalise, forward, top-k) -> rows of the predictions schema.
With GPUs the two stages run in separate actor pools, decoding on CPUs; on CPUs one
pool runs both (``model_stage.ReadAndClassify``). The model is prepared once, in the
driver (``program.build_program``); no actor imports torchvision, so the pools start
quickly. Evaluation labels through ``predict``; bulk labelling (``inference.bulk``) runs
the same stages per shard, each worker writing its own output.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, ExecutionResources

from imgcls.inference.decode import ReadDecodeBatch
from imgcls.inference.inputs import cut_runs
from imgcls.inference.model_stage import Classifier, ReadAndClassify
from imgcls.inference.program import build_program
from imgcls.inference.read import is_tar
from imgcls.inference.schema import COL_PATH

CPU_BATCH, GPU_BATCH = 64, 256  # images per model batch when none is given
ROWS_PER_BLOCK = 256
MIN_BLOCKS = 16


def input_blocks(paths: Sequence[str], rows_per_block: int = ROWS_PER_BLOCK) -> list[pa.Table]:
    """The blocks of ``input_rows``: each is one Ray Data task's input.

    A block holds up to ``rows_per_block`` plain files, or one tar on its own (a tar can
    hold thousands of images). Fewer files are cut into at least MIN_BLOCKS blocks, so
    that they still spread over the actors. Blocks of 256 files amortise the fixed cost
    of a Ray Data task: on 2 cores, tasks of 64 files labelled 570-590 images/s and tasks
    of 256 files 630-680, with the same 64 images decoded and labelled at a time. Bulk
    labelling plans its inputs without the driver instead (``imgcls.inference.inputs``).
    """
    plain = sum(not is_tar(p) for p in paths)
    per_block = max(1, min(rows_per_block, -(-plain // MIN_BLOCKS)))
    blocks = cut_runs(list(paths), per_block) or [[]]
    return [pa.table({COL_PATH: pa.array(b, pa.string())}) for b in blocks]


def input_rows(paths: Sequence[str], rows_per_block: int = ROWS_PER_BLOCK) -> ray.data.Dataset:
    """The rows ``predict`` takes: one per input file (or tar), in ``input_blocks``."""
    return ray.data.from_arrow(input_blocks(paths, rows_per_block))


def predict_here(paths: Sequence[str], model: str, *, batch_size: Optional[int] = None, top_k: int = 5,
                 embeddings: bool = False, runtime: str = "torch", max_pixels: int = 64_000_000,
                 tta: str = "none") -> pa.Table:
    """``predict`` of a few files in this process, on its CPUs: the same model program
    (``build_program``) and the same read, decode and classify stage
    (``model_stage.ReadAndClassify``) over the same input blocks, without starting an
    actor pool. Returns the OUTPUT_SCHEMA rows, one per input file (per tar member)."""
    payload = build_program(model, runtime, tta)
    stage = ReadAndClassify(payload, max_pixels=max_pixels, max_images=model_batch_size(batch_size, False), top_k=top_k,
                            embeddings=embeddings)
    return pa.concat_tables([stage({COL_PATH: block.column(COL_PATH).to_numpy(zero_copy_only=False)})
                             for block in input_blocks(paths)])


def model_batch_size(batch_size: Optional[int], use_gpu: bool) -> int:
    return batch_size or (GPU_BATCH if use_gpu else CPU_BATCH)


def pool_plan(use_gpu: Optional[bool], num_actors: Optional[int], separate_decode: Optional[bool] = None,
              node_types: Optional[dict] = None) -> dict:
    """Sizes and per-actor resources of the actor pools, from the running cluster and
    what its autoscaler can add.

    - Model actors: one per GPU. On CPUs, one single-threaded actor per core
      (two-threaded from 8 CPUs).
    - The pool grows with the cluster: from the actors that fit the nodes there now
      (at least 1, ``min_size``) up to those that fit when the autoscaler's node types
      (``devices.autoscaler_node_types``, or ``node_types``) have all started
      (``max_size``). Ray Data adds actors as the backlog asks for them, and the
      autoscaler nodes for the actors that fit nowhere; sized from the cluster at the
      start alone, a job on a cluster that starts with no workers kept one actor for
      its whole life. ``num_actors`` fixes the size. Without an autoscaler, min = max.
    - Decoding: by default in its own CPU actor pool only when the model runs on GPUs,
      so that the GPUs never wait for the CPU work. On CPUs the model actors read and
      decode their own batches (``decode`` is None): both stages would compete for the
      same cores anyway, and one pool saves passing every decoded image through the
      object store, a second pool's start-up and its processes' memory (on 2 cores:
      613 images/s where two pools label 560, and 4 s sooner started).
    - A separate decode pool runs from 1 up to all but one CPU per GPU (on CPU-only
      clusters a quarter of the CPUs, the model actors then keeping three quarters),
      scaled by Ray Data with the backlog. Its workers are actors rather than tasks so
      that their processes, which import torch once, stay up: with tasks Ray kept
      retiring and restarting idle worker processes, each restart costing seconds of
      CPU and hundreds of MB of memory.
    - CPU requests are fractional and leave a quarter of the CPUs unclaimed, so that a
      2-core machine cannot deadlock (whole-CPU actors there starve the other tasks).
      On an autoscaling cluster each node type is shared out so, and actors claim the
      smallest type's share, so that they fit every node type.
    """
    from imgcls.devices import autoscaler_node_types

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), int(res.get("GPU", 0))
    types = autoscaler_node_types() if node_types is None else node_types
    grow = [(int(t["max_workers"]), float(t["resources"].get("CPU", 0)), int(t["resources"].get("GPU", 0)))
            for t in types.values()]
    # What is not the autoscaler's to add or remove (the head, a static cluster's nodes).
    fixed_cpus, fixed_gpus = _head_resources() if grow else (cpus, gpus)
    max_gpus = max(gpus, fixed_gpus + sum(n * g for n, _, g in grow))
    max_cpus = max(cpus, fixed_cpus + sum(n * c for n, c, _ in grow))
    if use_gpu is None:
        use_gpu = gpus > 0
    if separate_decode is None:
        separate_decode = use_gpu
    if use_gpu:
        low, high = (num_actors, num_actors) if num_actors else (max(1, gpus), max(1, max_gpus))
        plan = {"num_gpus": 1, "num_cpus": 1, "threads": None, "use_gpu": True}
        decode_cpus, decode_max = 1, max(1, int(max_cpus) - high - 1)
    else:
        share = 0.75 if separate_decode else 1.0  # of the cores, for the model
        shapes = [_cpu_actors(c, share) for c in [cpus or 1] + [c for _, c, _ in grow if c > 0]]
        low, threads, actor_cpus = shapes[0]
        if len(shapes) > 1:  # an autoscaling cluster: what fits each node type
            threads, actor_cpus = min(s[1] for s in shapes[1:]), min(s[2] for s in shapes[1:])
            low = max(1, int(cpus * share * 0.75 // actor_cpus))
            high = max(low, _cpu_actors(fixed_cpus, share)[0] * (fixed_cpus > 0) + sum(
                n * int(c * share * 0.75 // actor_cpus) for n, c, _ in grow))
        else:
            high = low
        if num_actors:  # a given pool size shares the same cores
            threads = max(1, round(max(cpus, 1) * share / num_actors))
            actor_cpus = max(cpus, 1) * share * 0.75 / num_actors if len(shapes) == 1 else actor_cpus
        plan = {"num_gpus": 0, "num_cpus": actor_cpus, "threads": threads, "use_gpu": False}
        decode_max = max(1, int(max(max_cpus, 1) // 4))
        decode_cpus = max(cpus, 1) * 0.2 / max(1, int(max(cpus, 1) // 4))
    plan["min_size"], plan["max_size"] = (num_actors, num_actors) if num_actors else (low, high)
    plan["decode"] = {"max_size": decode_max, "num_cpus": decode_cpus} if separate_decode else None
    return plan


def _cpu_actors(cpus: float, share: float) -> tuple[int, int, float]:
    """(actors, threads each, CPUs each) of the CPU model pool on ``cpus`` CPUs, of
    which the model takes ``share``: one single-threaded actor per core (two-threaded
    from 8 CPUs), claiming three quarters of its cores."""
    threads = 1 if cpus < 8 else 2
    n = max(1, round(cpus * share / threads))
    return n, threads, cpus * share * 0.75 / n


def _head_resources() -> tuple[float, int]:
    """The head node's (CPUs, GPUs): on an autoscaling cluster, the part of it that the
    autoscaler neither adds nor removes."""
    for node in ray.nodes():
        if node["Alive"] and "node:__internal_head__" in node["Resources"]:
            return float(node["Resources"].get("CPU", 0)), int(node["Resources"].get("GPU", 0))
    return 0.0, 0


GROWING_TASKS_IN_FLIGHT = 4  # per actor of a pool that grows (Ray Data's default: 2)


def actor_pool(plan: dict, tasks: Optional[int] = None) -> ActorPoolStrategy:
    """The model pool of ``plan``: fixed, or growing with the cluster up to its max,
    starting with the actors that ``tasks`` tasks keep busy (``starting_actors``).

    A growing pool lets each actor hold GROWING_TASKS_IN_FLIGHT tasks. Ray Data adds
    ceil(size x (utilisation / 1.75 - 1)) actors at a time, and utilisation (tasks in
    flight per actor) cannot pass the tasks an actor may hold: with its default of 2
    the pool grew by one actor at a time, each new one waited for (a node, then a
    process importing torch: tens of seconds), so a job could end before it reached a
    second node. With 4 it about doubles at each step."""
    if plan["min_size"] == plan["max_size"]:
        return ActorPoolStrategy(size=plan["min_size"])
    initial = plan["min_size"] if tasks is None else starting_actors(plan, tasks)
    return ActorPoolStrategy(min_size=plan["min_size"], max_size=plan["max_size"], initial_size=initial,
                             max_tasks_in_flight_per_actor=GROWING_TASKS_IN_FLIGHT)


def starting_actors(plan: dict, tasks: int) -> int:
    """How many model actors a growing pool starts with: those that ``tasks`` tasks keep
    busy (GROWING_TASKS_IN_FLIGHT each), within the pool's min and max.

    Actors that fit no node yet wait as pending actors, which is the demand the Ray
    autoscaler adds nodes for; Ray Data then grows the pool from the backlog. Started at
    its min alone, the pool grew only as Ray Data's own cluster autoscaler asked for
    nodes, one per node type at a time and only once the claimed CPUs had averaged 75%
    over 10 s: the pool claims a quarter less than its cores (``pool_plan``), so on an
    idle 2-core cluster of 2-CPU nodes a 60 s job of 300 shards kept its actors on the
    first node and got a second node in its last seconds. Asking for the nodes beside
    Ray Data, through its autoscaling coordinator, did not help: the coordinator
    reserves what a requester asks for, so the pipeline's own share shrank to one actor."""
    return min(plan["max_size"], max(plan["min_size"], -(-tasks // GROWING_TASKS_IN_FLIGHT)))


def predict(rows: ray.data.Dataset, model: str, *, batch_size: Optional[int] = None, top_k: int = 5,
            embeddings: bool = False, runtime: str = "torch", use_gpu: Optional[bool] = None,
            num_actors: Optional[int] = None, max_pixels: int = 64_000_000, buffer_mb: int = 512,
            separate_decode: Optional[bool] = None, precision: str = "auto", tta: str = "none",
            gpu_decode: bool = False, program: str = "auto") -> ray.data.Dataset:
    """Labels ``rows`` (column path) and returns prediction rows.

    Args:
        rows: One row per input file or tar.
        model: Checkpoint folder, or export folder for runtime 'onnxruntime'; its
            meta gives the input size.
        buffer_mb: Object-store budget of the pipeline. Ray Data's default is a share of
            the whole object store, so a bigger input would fill more of it before
            backpressure starts; a fixed budget keeps memory flat.
        separate_decode: Read and decode in a CPU actor pool of their own; None does
            so only when the model runs on GPUs (see ``pool_plan``).
        gpu_decode: With a separate decode pool, leave JPEGs to the model actors, which
            decode them on their device (``model_stage.Classifier``).

    Returns:
        A lazy Dataset with the OUTPUT_SCHEMA columns; exactly one row per input file
        (per tar member for tars).
    """
    plan = pool_plan(use_gpu, num_actors, separate_decode)
    batch_size = model_batch_size(batch_size, plan["use_gpu"])
    payload = build_program(model, runtime, tta, program)
    classifier_kwargs = {"top_k": top_k, "embeddings": embeddings, "threads": plan["threads"],
                         "use_gpu": plan["use_gpu"], "precision": precision, "max_pixels": max_pixels}
    model_pool = dict(compute=actor_pool(plan), num_cpus=plan["num_cpus"],
                      num_gpus=plan["num_gpus"], batch_format="numpy")
    if plan["decode"] is None:  # CPU only: each model actor reads and decodes its own batches
        predictions = rows.map_batches(
            ReadAndClassify, fn_constructor_kwargs={"payload": payload, "max_pixels": max_pixels,
                                                    "max_images": batch_size, **classifier_kwargs},
            batch_size=None, **model_pool)
    else:
        decode = plan["decode"]
        decoded = rows.map_batches(
            ReadDecodeBatch, fn_constructor_kwargs={"image_size": payload.image_size, "max_pixels": max_pixels,
                                                    "max_images": batch_size, "defer_jpeg": gpu_decode},
            batch_size=None, compute=ActorPoolStrategy(min_size=1, max_size=decode["max_size"]),
            num_cpus=decode["num_cpus"])
        predictions = decoded.map_batches(
            Classifier, fn_constructor_kwargs={"payload": payload, **classifier_kwargs}, batch_size=batch_size,
            **model_pool)
    predictions.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=buffer_mb * 2**20)
    return predictions
