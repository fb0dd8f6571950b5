"""``imgcls`` command line: each command builds a config and calls the library."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import traceback
from dataclasses import asdict
from typing import Callable

import click

from imgcls.config import (PACKAGED_WEIGHTS_MODELS, TORCHVISION_MODELS, DataConfig, DriftThresholds, JobConfig,
                           ModelConfig, PredictConfig, ServeConfig, TrainConfig)
from imgcls.options import config_options, load_yaml, resolve
from imgcls.paths import is_registry_uri, local_path, resolve_paths


VERBOSE = False  # set by ``imgcls --verbose``

# The mistakes of a user's input or config: one line (``imgcls CMD: error: ...``) and
# exit status 2, the traceback only with --verbose. Named rather than imported, as
# their modules are slow to import; one not imported yet cannot have been raised.
# click's own usage errors (bad flags, click.UsageError) are shown the same way.
USER_ERRORS = (
    ("imgcls.config", "ConfigError"),  # a wrong setting, e.g. in a checkpoint's config.yaml
    ("imgcls.labelled", "DataError"),  # unusable data: unknown labels, no images, an empty split
    ("imgcls.training.trainer", "RunFolderError"),  # a run folder with checkpoints, without --resume/--overwrite
    ("imgcls.manifest", "ManifestError"),  # a labelling manifest without a path column
    ("imgcls.inference.inputs", "OutputFolderError"),  # an output folder that holds another job's output
    ("imgcls.inference.lease", "LeaseHeldError"),  # an output folder that another job is writing
    ("imgcls.training.tune", "TrialsFailedError"),  # every trial failed: the message shows the first one's error
    ("imgcls.evaluation.review", "ReviewError"),  # predictions that cannot be reviewed as asked
    ("imgcls.evaluation.labelling", "LabelError"),  # a review file the labelling page cannot open
    ("imgcls.evaluation.monitor", "MonitorError"),  # runs that cannot be compared
    ("imgcls.inference.program", "EnsembleError"),  # checkpoints that cannot label as one ensemble
    ("imgcls.serving.deploy", "ServeError"),  # a serve command that cannot be done: no such app, an open --host
    ("builtins", "FileNotFoundError"),  # a path given that does not exist
    ("imgcls.registry", "RegistryError"),  # a models:/ URI that names no registered version
)


def user_error_types() -> tuple[type, ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)


class UserError(click.ClickException):
    """A user's mistake, shown as one line: ``imgcls COMMAND: error: MESSAGE``."""

    exit_code = 2

    def __init__(self, command: str | None, message: str):
        super().__init__(" ".join(str(message).split()))
        self.command = command

    def show(self, file=None) -> None:
        prog = f"imgcls {self.command}" if self.command else "imgcls"
        click.echo(f"{prog}: error: {self.message}", file=file, err=True)


class Imgcls(click.Group):
    """The command group: user errors (``USER_ERRORS``, click's usage errors) as one line
    and exit status 2; any other exception is a bug and keeps its traceback (status 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, click.exceptions.NoArgsIsHelpError):  # the latter shows the help
            raise
        except click.UsageError as e:
            command = ctx.invoked_subcommand
            usage = f"imgcls {command} --help" if command else "imgcls --help"
            raise UserError(command, f"{e.format_message()} (see {usage})") from None
        except Exception as e:
            if not isinstance(e, user_error_types()):
                raise
            if VERBOSE:
                traceback.print_exception(e)
            cause = getattr(e, "cause", None)  # a Ray task's error carries the original
            raise UserError(ctx.invoked_subcommand, cause if isinstance(cause, BaseException) else e) from None


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Starts a private local Ray cluster with ``num_cpus`` CPUs when given; otherwise joins
    the cluster named by RAY_ADDRESS (as under ``ray job submit``), a running local one, or
    starts one. Unless ``--verbose``, Ray's own INFO logs and Ray Data's progress reports
    are kept out of the output, which then shows imgcls's own lines: the devices chosen,
    labelling progress, one line per epoch, the summary. ``log_to_driver`` False keeps the
    workers' output out of this process's too, unless ``--verbose`` (a long-running server)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if VERBOSE else logging.WARNING
    from imgcls import local_cluster

    local_cluster.set_environment()  # for the cluster ray.init starts, if it starts one
    if num_cpus is not None:
        # With its dashboard: Ray Train's placement-group cleaner watches the run's
        # controller through the State API, which the dashboard serves; without it the
        # cleaner warns every second that it cannot ("Failed to query Ray Train Controller
        # actor state"). Another cluster's dashboard on the port moves this one to the
        # next, and the workers name their own cluster (``local_cluster``).
        ray.init(address="local", num_cpus=num_cpus, logging_level=level, log_to_driver=log_to_driver or VERBOSE,
                 runtime_env={"worker_process_setup_hook": local_cluster.SETUP_HOOK})
    else:
        ray.init(logging_level=level, log_to_driver=log_to_driver or VERBOSE)
    if not VERBOSE:
        import ray.data  # noqa: F401 - configures its loggers on import; set their level after

        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)


def init_ray_while_importing(num_cpus: int | None, *modules: str, warm: tuple[str, ...] = (),
                             warm_unless: Callable[[], bool] | None = None) -> None:
    """``init_ray`` while another thread imports ``modules``.

    Importing torch and torchvision costs about 9 s of CPU on a small machine, and
    starting a local Ray cluster about 7 s of mostly waiting; side by side they take
    about 4 s less than one after the other. An import error surfaces again when the
    caller imports the module itself.

    ``warm`` names modules that Ray's task workers should import meanwhile, one worker
    per CPU, so that the first tasks (e.g. the training data's one-time decode) find
    their processes started and torch imported (seconds of CPU each) instead of waiting.
    No worker is warmed when ``warm_unless()`` (asked once Ray is up) says that no task
    will need one, e.g. when the data is small enough to decode here.
    """
    def import_all():
        _import_modules(*modules)

    importer = threading.Thread(target=import_all, daemon=True)
    importer.start()
    init_ray(num_cpus)
    if warm and not (warm_unless is not None and warm_unless()):
        import ray

        task = ray.remote(num_cpus=1)(_import_modules)
        for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1)))):
            task.remote(*warm)
    importer.join()


def _import_modules(*modules: str) -> None:
    for module in modules:
        importlib.import_module(module)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def resolve_job(config_path, flags) -> JobConfig:
    import dataclasses
    import os

    raw = load_yaml(config_path)
    train = resolve(TrainConfig, raw.get("train", {}), flags)
    if train.tracking_uri is None and os.environ.get(TRACKING_ENV):  # neither the flag nor the YAML gave one
        train = dataclasses.replace(train, tracking_uri=os.environ[TRACKING_ENV])
    if train.register and not train.tracking_uri:
        raise click.UsageError("--register needs a tracking URI: --tracking-uri, the YAML's train.tracking_uri, "
                               f"or {TRACKING_ENV}")
    # Paths made absolute here: Ray's tasks and Tune's trials run in folders of their own.
    job = resolve_paths(JobConfig(data=resolve(DataConfig, raw.get("data", {}), flags),
                                  model=resolve(ModelConfig, raw.get("model", {}), flags), train=train))
    if is_registry_uri(job.train.init_from):
        # The downloaded version's folder, which the training workers read as any checkpoint
        # (its registered_model.json names the version and its run) without asking MLflow.
        init_from = model_arg(job.train.init_from, job.train.tracking_uri, local=True)
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, init_from=init_from))
    return job


TRACKING_ENV = "MLFLOW_TRACKING_URI"


def tracking_option(fn):
    """``--tracking-uri`` of the commands that log to MLflow or take a ``models:/`` URI."""
    return click.option("--tracking-uri", envvar=TRACKING_ENV, default=None,
                        help=f"MLflow tracking URI (e.g. sqlite:///out/mlflow.db): the command's run is logged there, "
                             f"and models:/NAME@ALIAS is looked up there. Default: {TRACKING_ENV}; none: no tracking.")(fn)


def use_tracking(tracking_uri: str | None) -> str | None:
    """``tracking_uri`` with a relative SQLite path made absolute, also set as this process's
    ``MLFLOW_TRACKING_URI``, which the library's own ``models:/`` lookups then use."""
    import os

    from imgcls.paths import tracking_path

    tracking_uri = tracking_path(tracking_uri)
    if tracking_uri:
        os.environ[TRACKING_ENV] = tracking_uri
    return tracking_uri


def registered_model(uri: str) -> str:
    """A ``models:/NAME@ALIAS`` pinned to the version the alias names now (``models:/NAME/3``)
    and downloaded to the model cache (``registry.checkpoint_folder``): the job keeps that
    version if the alias moves while it runs, and its workers find it without asking MLflow."""
    from imgcls.registry import checkpoint_folder, pin

    pinned = pin(uri)
    checkpoint_folder(pinned)
    return pinned


def model_arg(value: str, tracking_uri: str | None = None, local: bool = False) -> str:
    """A command's ``--model`` (a comma-separated ensemble too): local paths made absolute,
    ``models:/`` URIs pinned to their version (``registered_model``), or with ``local`` its
    downloaded checkpoint folder."""
    from imgcls.paths import members

    out = []
    for one in members(value):
        if is_registry_uri(one):
            use_tracking(tracking_uri)
            one = registered_model(one)
            if local:
                from imgcls.tracking import local_model

                one = local_model(one)
        out.append(local_path(one))
    return ",".join(out)


def check_local_roots(root: str) -> None:
    """Refuses, before a cluster starts, a --root on local disk that names nothing usable:
    each must be a folder or a manifest file. Store URIs are checked when listed."""
    import os

    from imgcls import storage
    from imgcls.paths import members

    for one in members(root or ""):
        if storage.protocol(one) != "file":
            continue
        path = storage.filesystem(one)[1]
        if not (os.path.isdir(path) or (one.lower().endswith(storage.MANIFEST_EXTENSIONS) and os.path.isfile(path))):
            raise click.BadParameter(f"{one} is neither a folder nor a .csv/.parquet manifest", param_hint="'--root'")


def decodes_here(root: str) -> bool:
    """Whether the one-time decode of a training run over ``root`` runs in this process
    (``devices.runs_here``) whatever its splits: every root is a local folder and all of
    them hold at most ``devices.IN_PROCESS_MAX_IMAGES`` images, counted (hidden files and
    folders skipped by the listings' own rule, ``storage.hidden_below``) until one more
    is found. A manifest or a store URI is not counted: False."""
    import os

    from imgcls import devices, storage
    from imgcls.labelled import is_image_path
    from imgcls.paths import members

    count = 0
    for one in members(root or ""):
        path = storage.filesystem(one)[1] if storage.protocol(one) == "file" else None
        if path is None or not os.path.isdir(path):
            return False
        for top, folders, files in os.walk(path):  # hidden folders pruned, not walked
            folders[:] = [f for f in folders if not storage.hidden_below(path, os.path.join(top, f))]
            count += sum(1 for f in files if is_image_path(f) and not storage.hidden_below(path, os.path.join(top, f)))
            if not devices.runs_here(count):
                return False
    return True


def check_weights(model: ModelConfig) -> None:
    """Refuses, before any work starts, ``--weights`` that cannot load: 'packaged' for an
    architecture without packaged weights, or a path or URI where nothing is. A
    torchvision enum name (for a torchvision architecture, see ``models.create_model``)
    is left to torchvision."""
    weights = model.weights
    if weights is None:
        return
    if weights == "packaged":
        if model.arch not in PACKAGED_WEIGHTS_MODELS:
            raise click.BadParameter(f"'packaged' weights exist for {', '.join(PACKAGED_WEIGHTS_MODELS)} only, "
                                     f"not {model.arch}", param_hint="'--weights'")
        return
    if model.arch in TORCHVISION_MODELS and "/" not in weights and "." not in weights:
        return  # an enum name such as DEFAULT or IMAGENET1K_V1
    from imgcls import storage

    try:
        found = storage.exists(weights)
    except (ValueError, ImportError) as e:  # an unknown protocol, or its package missing
        raise click.BadParameter(f"cannot read {weights}: {e}", param_hint="'--weights'") from None
    if not found:
        names = " (torchvision enum names such as DEFAULT are for torchvision architectures)" \
            if "/" not in weights and "." not in weights else ""
        raise click.BadParameter(f"no weights file at {weights}{names}", param_hint="'--weights'")


@click.group(cls=Imgcls)
@click.option("--verbose", is_flag=True,
              help="Also show Ray's own logs, Ray Data's progress reports and the traceback of an error.")
def cli(verbose):
    """Distributed image classification on Ray: train, label, evaluate, export."""
    global VERBOSE
    VERBOSE = verbose


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML file with data/model/train sections.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@config_options(DataConfig, ModelConfig, TrainConfig)
def train(config_path, num_cpus, **flags):
    """Train a model with Ray Train, then report metrics on the held-out test split."""
    job = resolve_job(config_path, flags)
    check_weights(job.model)
    check_local_roots(job.data.root)
    init_ray_while_importing(num_cpus, "imgcls.commands", warm=("imgcls.training.cache",),
                             warm_unless=lambda: decodes_here(job.data.root))
    from imgcls.commands import run_training

    echo_json(run_training(job))


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML file with a predict section.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@tracking_option
@config_options(PredictConfig)
def predict(config_path, num_cpus, tracking_uri, **flags):
    """Label every file under --input and write Parquet shards to --output."""
    cfg = resolve_paths(resolve(PredictConfig, load_yaml(config_path).get("predict", {}), flags))
    if not (cfg.model and cfg.input and cfg.output):
        raise click.UsageError("--model, --input and --output are required")
    if "models:/" in cfg.model:  # pinned to a version, which _job.json then names
        from dataclasses import replace

        cfg = replace(cfg, model=model_arg(cfg.model, tracking_uri))
    from imgcls.inference.finished import finished_summary
    from imgcls.inference.lease import refuse_if_held

    done = finished_summary(cfg)  # a rerun over a complete output: no Ray, no torch
    if done is not None:
        click.echo(f"{cfg.output} is complete: all {done['shards']} shards labelled before; nothing to do", err=True)
        echo_json(done)
        return
    refuse_if_held(cfg.output)  # another job writes there: fail now, not after starting Ray
    # imgcls.checkpoint brings torchvision, which program.build_program needs.
    init_ray_while_importing(num_cpus, "imgcls.inference.bulk", "imgcls.checkpoint")
    from imgcls.inference.bulk import label_images

    echo_json(asdict(label_images(cfg)))  # the summary, once


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML file with data/model/train sections.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@click.option("--num-samples", type=int, default=4, show_default=True, help="Trials to run.")
@click.option("--grace-period", type=int, default=1, show_default=True, help="Epochs before a trial may be stopped early.")
@click.option("--max-concurrent", type=int, default=1, show_default=True, help="Trials running at once.")
@click.option("--search", type=click.Choice(["random", "optuna"]), default="random", show_default=True,
              help="How trials are proposed: at random, or by Optuna's TPE from the results so far (needs imgcls[tune]).")
@config_options(DataConfig, ModelConfig, TrainConfig)
def tune(config_path, num_cpus, num_samples, grace_period, max_concurrent, search, **flags):
    """Search lr, weight decay, batch size and augmentation strength with Ray Tune and ASHA."""
    if flags.get("register"):
        raise click.UsageError("a sweep registers no model: train its best settings (tune_best.yaml) with --register, "
                               "or imgcls register that run's checkpoint")
    job = resolve_job(config_path, flags)
    check_weights(job.model)
    check_local_roots(job.data.root)
    from imgcls.training.tune import run_tune

    init_ray(num_cpus)
    echo_json(asdict(run_tune(job, num_samples=num_samples, grace_period=grace_period, max_concurrent=max_concurrent,
                              search=search)))


@cli.command()
@click.option("--model", "models", required=True, multiple=True,
              help="Checkpoint folder (local or fsspec URI); give it more than once to evaluate an ensemble.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="Test-time augmentation: 'flip' averages each image's probabilities with its mirror's.")
@click.option("--data", default=None, help="Labelled images: ImageFolder tree or path,label manifest.")
@click.option("--predictions", default=None,
              help="Predictions Parquet (file or folder) instead of --data; true labels come from a "
                   "'true_label' column, else from each file's parent folder name.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default=None,
              help="Instead of --data: the checkpoint's own held-out split, as saved by imgcls train.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for metrics.json, PNGs, report.html.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@tracking_option
def evaluate(models, tta, data, predictions, split, output, num_cpus, tracking_uri):
    """Metrics, confusion matrix, plots and report.html for a labelled set (of one model,
    or of an ensemble: its members' probabilities averaged)."""
    tracking_uri = use_tracking(tracking_uri)
    asked = list(models)
    models = [model_arg(m, tracking_uri, local=True) for m in models]
    model = ",".join(models)
    data, predictions, output = (local_path(p) for p in (data, predictions, output))
    if predictions and (len(models) > 1 or tta != "none"):
        raise click.UsageError("--predictions scores predictions already made: give one --model and no --tta")
    if sum(map(bool, (data, predictions, split))) != 1:
        raise click.UsageError("give exactly one of --data, --split and --predictions")
    if split:
        from imgcls.checkpoint import split_manifest

        data = split_manifest(local_path(models[0]), split)  # an ensemble: its first member's split
    if data:
        init_ray_while_importing(num_cpus, "imgcls.commands")
    from imgcls.evaluation.evaluate import left_out_line
    from imgcls.evaluation.evaluate import run_evaluation

    result = run_evaluation(model, output, data=data, predictions=predictions, tta=tta)
    note = left_out_line(result)
    if note:
        click.echo(f"imgcls evaluate: {note}", err=True)
    if result.get("training_overlap"):
        click.echo(f"imgcls evaluate: warning: {result['training_overlap']} of the {result['num_samples']} images "
                   "were in the checkpoint's training split, so these figures overstate accuracy on new images; "
                   "--split test scores the held-out split", err=True)
    if tracking_uri:
        import os

        from imgcls import storage
        from imgcls.tracking import log_result_run

        files = {name: os.path.join(output, name) for name in sorted(os.listdir(output))
                 if name.endswith((".json", ".html", ".png"))}
        run = log_result_run(tracking_uri, "evaluate", models[0], storage.read_json(result["metrics"]), files,
                             params={"model": ",".join(asked), "data": data or predictions or "", "split": split or "",
                                     "tta": tta})
        click.echo(f"imgcls evaluate: logged to MLflow run {run}", err=True)
    click.echo(f"accuracy {result['accuracy']:.4f}  macro F1 {result['macro_f1']:.4f}  report {result['report']}")


@cli.command()
@click.option("--model", "model", required=True, help="Checkpoint folder (local or fsspec URI).")
@click.option("--output", required=True, help="Export folder (local or fsspec URI).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["onnx", "torchscript", "safetensors"]),
              help="Formats to write (repeatable); default all.")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True, help="ONNX opset (17 or newer).")
@tracking_option
def export(model, output, formats, opset, tracking_uri):
    """Export a checkpoint to ONNX (dynamic batch), TorchScript and safetensors."""
    from imgcls.inference.export import FORMATS, export_checkpoint

    model = model_arg(model, tracking_uri, local=True) if is_registry_uri(model) else model

    echo_json(export_checkpoint(model, output, formats or FORMATS, opset=opset))


@cli.command()
@click.option("--model", "model", required=True, help="Checkpoint folder (local or fsspec URI).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the overlay PNGs.")
@click.option("--image", "images", multiple=True, help="Image to explain (repeatable).")
@click.option("--mistakes-from", default=None,
              help="Explain the most confident mistakes listed in this evaluation folder's predictions.parquet.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default=None,
              help="Explain the first --top images of the checkpoint's own split, as saved by imgcls train.")
@click.option("--top", type=int, default=8, show_default=True, help="How many mistakes (or split images) to explain.")
@click.option("--layer", default=None,
              help="Module name to explain at (default: the last activation with spatial extent, the one only "
                   "pooling and the head follow: resnet layer4, torchvision features, Lite0's activated head).")
@click.option("--method", type=click.Choice(["gradcam", "gradcam++", "scorecam", "eigencam"]), default="gradcam",
              show_default=True, help="Class activation map (scorecam runs the model once per channel: slow).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images explained in one forward and backward pass.")
@tracking_option
def explain(model, output, images, mistakes_from, split, top, layer, method, batch_size, tracking_uri):
    """Captioned class activation maps (Grad-CAM by default) for chosen images, a split's
    images or the worst mistakes, and explain.html showing each beside its input."""
    from imgcls.evaluation.explain import explain_images
    from imgcls.evaluation.evaluate import worst_mistakes

    model = model_arg(model, tracking_uri, local=True) if is_registry_uri(model) else model
    paths, truths = list(images), [None] * len(images)
    mistakes = worst_mistakes(mistakes_from, top, with_truth=True) if mistakes_from else []
    paths += [p for p, _ in mistakes]
    truths += [t for _, t in mistakes]
    if split:
        from imgcls.checkpoint import split_manifest
        from imgcls.labelled import list_labelled_images

        chosen = list_labelled_images(split_manifest(model, split))
        paths += chosen.paths[:top]
        truths += chosen.labels[:top]
    if not paths:
        raise click.UsageError("give --image, --split or --mistakes-from")
    results = explain_images(model, paths, output, layer=layer, method=method, true_labels=truths,
                             batch_size=batch_size)
    if mistakes_from:
        from imgcls.evaluation.report import link_explanations

        link_explanations(mistakes_from, results[len(images):len(images) + len(mistakes)])
    echo_json(results)


@cli.command()
@click.option("--predictions", required=True, help="Predictions Parquet (file or folder) of imgcls predict.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for review.csv and review.html.")
@click.option("--strategy", type=click.Choice(["margin", "entropy", "least-confident", "random"]), default="margin",
              show_default=True, help="What makes a prediction worth a look (see imgcls.evaluation.review).")
@click.option("--n", "n", type=click.IntRange(min=1), default=100, show_default=True, help="Predictions to pick.")
@click.option("--per-class/--no-per-class", default=False, show_default=True,
              help="Spread the picks over the predicted classes, which take turns.")
@click.option("--dedup", type=click.FloatRange(-1, 1), default=None,
              help="Skip a pick whose embedding's cosine similarity to an earlier pick is above this (e.g. 0.98); "
                   "needs predictions labelled with --embeddings.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --strategy random.")
@click.option("--serve", is_flag=True, help="Then answer the picks on the labelling page (as imgcls label does).")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --serve: the labelling page's address.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="With --serve: the labelling page's port (0: any free one).")
def review(predictions, output, strategy, n, per_class, dedup, seed, serve, host, port):
    """Pick the predictions a person should check: review.csv (answer its picks on the
    labelling page, imgcls label, or fill in its label column; then train on it), and a
    contact sheet, review.html."""
    from imgcls.evaluation.labelling import serve_review, write_context
    from imgcls.evaluation.review import run_review

    result = run_review(local_path(predictions), local_path(output), strategy, n, per_class, dedup, seed)
    write_context(result["manifest"], local_path(predictions))
    echo_json(result)
    if serve:
        serve_review(result["manifest"], host, port)


@cli.command()
@click.argument("review_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The page has no login: anyone who reaches it may answer.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port (0: any free one).")
@click.option("--classes", default=None, help="Comma-separated classes to offer (default: the model's, from "
                                               "review.json beside the file).")
@click.option("--predictions", default=None,
              help="Predictions the file was picked from, to (re)write review.json (the model's classes and "
                   "each pick's top-k) from; imgcls review writes it.")
def label(review_file, host, port, classes, predictions):
    """Answer the picks of a review file (review.csv of imgcls review) on a local page: one
    image at a time, large, with the model's top classes; a button (and a number key) per
    class, skip, not any of these. Every answer is saved to the file at once."""
    from imgcls.evaluation.labelling import serve_review

    serve_review(local_path(review_file), host, port, classes=classes.split(",") if classes else None,
                 predictions=local_path(predictions) if predictions else None)


@cli.command()
@click.option("--reference", required=True,
              help="Predictions Parquet (file or folder) to compare with, or a checkpoint of imgcls train, whose "
                   "reference.parquet holds its validation split's predictions.")
@click.option("--current", required=True, help="Predictions Parquet (file or folder) of the new run.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for drift.json and drift.html.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=0.01, show_default=True,
              help="A test whose p-value is below this, and whose effect size is at least its threshold "
                   "(--class-threshold etc.), reports drift.")
@click.option("--sample", type=click.IntRange(min=10), default=10_000, show_default=True,
              help="Rows of each run the class, error and confidence tests see (the effect sizes count all rows).")
@click.option("--embedding-sample", type=click.IntRange(min=0), default=500, show_default=True,
              help="Embeddings sampled from each run for the MMD test (0: leave the embeddings out; they need "
                   "predictions labelled with --embeddings).")
@click.option("--permutations", type=click.IntRange(min=20), default=500, show_default=True,
              help="Permutations of the MMD test's p-value.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples and permutations.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@config_options(DriftThresholds)
@tracking_option
def monitor(reference, current, output, alpha, sample, embedding_sample, permutations, seed, num_cpus, tracking_uri,
            **flags):
    """Drift of a labelling run against a reference: predicted classes, confidence, error
    rows, embeddings. Writes drift.json and drift.html; exits with status 1 on drift."""
    from imgcls.evaluation.monitor import check_runs

    tracking_uri = use_tracking(tracking_uri)
    thresholds = resolve(DriftThresholds, {}, flags)
    current = local_path(current)
    model = model_arg(reference, tracking_uri, local=True) if is_registry_uri(reference) else local_path(reference)
    reference = check_runs(model, current, embedding_sample)  # at once, not after Ray's start
    init_ray_while_importing(num_cpus, "scipy.stats")  # the tests' module, meanwhile
    from imgcls.evaluation.monitor import run_monitor

    result = run_monitor(reference, current, local_path(output), alpha, sample, embedding_sample, permutations, seed,
                         thresholds)
    if tracking_uri:
        from imgcls.tracking import log_monitor_run

        result["mlflow_run_id"] = log_monitor_run(tracking_uri, model, current, result)
    echo_json(result)
    if result["drift"]:
        click.echo(f"imgcls monitor: drift in {', '.join(result['drifted'])} (report {result['report']})", err=True)
        sys.exit(1)


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML file with a serve section.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@click.option("--detach", is_flag=True,
              help="Deploy onto the running Ray cluster and return; the application runs until --shutdown.")
@click.option("--update", is_flag=True,
              help="Point the running application (--name) at --model: its replicas load it and swap, with no "
                   "request dropped; its other settings stay as deployed.")
@click.option("--shutdown", is_flag=True, help="Stop the running application (--name); its replicas write their log.")
@click.option("--write-config", type=click.Path(dir_okay=False), default=None,
              help="Write the config that `serve deploy` takes to this file, and deploy nothing.")
@tracking_option
@config_options(ServeConfig)
def serve(config_path, num_cpus, detach, update, shutdown, write_config, tracking_uri, **flags):
    """Classify images sent over HTTP, on Ray Serve: POST /v1/classify and the Open Inference
    Protocol (/v2), with dynamic batching and replicas that scale with the load."""
    import os
    import time

    cfg = resolve_paths(resolve(ServeConfig, load_yaml(config_path).get("serve", {}), flags))
    if cfg.model and "models:/" in cfg.model:
        # The alias is resolved here, once, to its version's checkpoint (downloaded to this
        # node's model cache), which the replicas load: moving the alias never changes a
        # running server unnoticed; --update with the alias moves it to the new version.
        from dataclasses import replace

        cfg = replace(cfg, model=model_arg(cfg.model, tracking_uri, local=True))
    if sum((detach, update, shutdown, bool(write_config))) > 1:
        raise click.UsageError("give at most one of --detach, --update, --shutdown and --write-config")
    if not (cfg.model or shutdown):
        raise click.UsageError("--model is required")
    from imgcls.serving import deploy

    token = os.environ.get(deploy.TOKEN_ENV) or None
    if write_config:
        import yaml

        if not (deploy.is_loopback(cfg.host) or token or cfg.insecure):
            click.echo(f"imgcls serve: the replicas will refuse to start on {cfg.host} unless {deploy.TOKEN_ENV} is "
                       "set in the nodes' environment (see cluster/kuberay/rayservice.yaml)", err=True)
        with open(write_config, "w") as f:
            yaml.safe_dump(deploy.serve_config(cfg, token), f, sort_keys=False)
        click.echo(write_config)
        return
    warning = None if (update or shutdown) else deploy.check_access(cfg, token)  # before Ray starts
    if update or shutdown or detach:  # these act on a running cluster, never start one
        import ray

        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING", log_to_driver=VERBOSE)
        except ConnectionError:
            raise deploy.ServeError("no running Ray cluster found: start one (ray start --head) or run imgcls "
                                    "serve in the foreground, without --detach/--update/--shutdown") from None
    if shutdown:
        deploy.shutdown(cfg.name)
        click.echo(f"imgcls serve: {cfg.name} stopped", err=True)
        return
    if update:
        deploy.update(cfg.name, deploy.user_config(cfg))
        click.echo(f"imgcls serve: {cfg.name} now answers with {cfg.model}", err=True)
        return
    if warning:
        click.secho(warning, err=True, fg="red", bold=True)
    if not detach:
        from imgcls import local_cluster

        local_cluster.set_environment(deploy.SERVE_ENVIRONMENT)  # for the cluster init_ray starts, if it does
        init_ray(num_cpus, log_to_driver=False)  # the replicas' logs are in Ray's log folder (--verbose: here)
    deploy.deploy(deploy.serve_config(cfg, token))
    click.echo(f"imgcls serve: {cfg.name} answers on http://{cfg.host}:{cfg.port}/v1/classify with {cfg.model}"
               + ("" if detach else "; Ctrl-C stops it"), err=True)
    if detach:
        return
    import ray

    click.echo(f"imgcls serve: its Ray cluster is at {ray.get_runtime_context().gcs_address}: "
               "RAY_ADDRESS=that for imgcls serve --update or --shutdown from another shell", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        deploy.shutdown(cfg.name)


@cli.command()
@click.option("--model", "model", required=True, help="Checkpoint folder to register, e.g. runs/NAME/best.")
@click.option("--name", required=True, help="Registered model name; each registration adds a version.")
@click.option("--alias", default=None, help="Point this alias (e.g. champion) at the new version.")
@tracking_option
def register(model, name, alias, tracking_uri):
    """Register a checkpoint as a new version of a model in MLflow's registry (in the run
    that trained it); use it anywhere as models:/NAME/VERSION or models:/NAME@ALIAS."""
    tracking_uri = use_tracking(tracking_uri)
    if not tracking_uri:
        raise click.UsageError(f"a tracking URI is needed: --tracking-uri or {TRACKING_ENV}")
    from imgcls.registry import register as register_model

    echo_json(register_model(local_path(model), name, alias, tracking_uri))


@cli.command()
@click.option("--name", required=True, help="Registered model name.")
@click.option("--alias", required=True, help="Alias to move, e.g. champion.")
@click.option("--version", "version", type=click.IntRange(min=1), required=True,
              help="Version the alias points to from now on: promoting a new one, or rolling back.")
@tracking_option
def alias(name, alias, version, tracking_uri):
    """Point models:/NAME@ALIAS at another version (promote, or roll back)."""
    tracking_uri = use_tracking(tracking_uri)
    if not tracking_uri:
        raise click.UsageError(f"a tracking URI is needed: --tracking-uri or {TRACKING_ENV}")
    from imgcls.registry import set_alias

    set_alias(name, alias, version, tracking_uri)
    click.echo(f"models:/{name}@{alias} -> models:/{name}/{version}")


@cli.command("fetch-data")
@click.argument("name", type=click.Choice(["fashion-mnist", "dogs-cats"]))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--per-class", type=int, default=None, help="Keep at most this many images per class.")
def fetch_data(name, dest, per_class):
    """Write a real dataset from a package registry as an ImageFolder tree."""
    from imgcls.datasets import FetchError, fetch_dogs_cats, fetch_fashion_mnist

    try:
        if name == "fashion-mnist":
            fetch_fashion_mnist(dest, per_class=per_class)
        else:
            fetch_dogs_cats(dest, per_class=per_class)
    except FetchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(dest)


@cli.command()
@click.option("--workdir", default="out/demo", show_default=True, help="Where data, checkpoints and predictions go.")
@click.option("--per-class", type=int, default=1500, show_default=True, help="Fashion-MNIST images per class.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the main job's recipe).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
def demo(workdir, per_class, epochs, num_cpus):
    """The main job on a small real dataset: fetch, train, evaluate, label a folder."""
    workdir = local_path(workdir)  # Ray's workers may run in another folder
    init_ray_while_importing(num_cpus, "imgcls.commands", warm=("imgcls.training.cache",))
    from imgcls.commands import run_demo

    echo_json(run_demo(workdir, per_class=per_class, epochs=epochs))


if __name__ == "__main__":
    cli()
