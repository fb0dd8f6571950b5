import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgcls.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def commands():
    return sorted(cli.commands)


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert cli.commands[name].help and cli.commands[name].help.strip()


@pytest.mark.parametrize("name", commands())
def test_every_command_is_documented_in_readme(name):
    assert re.search(rf"imgcls {re.escape(name)}\b", README.read_text()), f"README does not show `imgcls {name}`"


def test_every_train_flag_has_a_docstring():
    for param in cli.commands["train"].params:
        if param.name in ("config_path", "num_cpus"):
            continue
        assert "[default:" in param.help and len(param.help.split("[default:")[0].strip()) > 10, param.name


def test_invalid_flag_value_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--root", str(tmp_path), "--optimizer", "adam"])
    assert result.exit_code == 2 and "'--optimizer': 'adam' is not one of 'sgd', 'adamw'" in result.output


def test_predict_requires_paths():
    result = CliRunner().invoke(cli, ["predict", "--model", "x"])
    assert result.exit_code == 2 and "required" in result.output


def test_main_job_yaml_is_the_demos_recipe():
    """jobs/configs/fashion_mnist.yaml and `imgcls demo` train the same recipe."""
    from imgcls.cli import resolve_job
    from imgcls.commands import demo_job

    yaml_job = resolve_job(str(README.parent / "jobs" / "configs" / "fashion_mnist.yaml"), {})
    demo = demo_job(yaml_job.data.root, yaml_job.train.storage_path)
    assert yaml_job.model == demo.model
    assert yaml_job.train == demo.train
    assert dataclasses.replace(yaml_job.data, val_fraction=0.1, test_fraction=0.1) == demo.data


# --- issue #17 -------------------------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import fields  # noqa: E402

import click  # noqa: E402
import yaml  # noqa: E402

from imgcls.config import DataConfig, ModelConfig, PredictConfig, TrainConfig  # noqa: E402
from imgcls.options import NONE, OrNone  # noqa: E402

CONFIG_CLASSES = (DataConfig, ModelConfig, TrainConfig, PredictConfig)


def parse(command, args):
    """The flags of ``imgcls COMMAND ARGS`` as click parses them, without running the command."""
    return cli.commands[command].make_context(command, list(args)).params


def write_yaml(tmp_path, data):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_none_flag_clears_what_the_yaml_sets(tmp_path):
    from imgcls.cli import resolve_job

    config = write_yaml(tmp_path, {
        "data": {"root": "x", "max_per_class": 5, "cache_path": "/tmp/c"},
        "model": {"arch": "efficientnet_lite0", "weights": "packaged", "freeze_backbone": True, "unfreeze_after": 2},
        "train": {"ema_decay": 0.99, "num_to_keep": 2},
    })
    assert resolve_job(config, parse("train", [])).model.weights == "packaged"
    flags = parse("train", ["--weights", "None", "--max-per-class", "none", "--unfreeze-after", "NONE",
                            "--ema-decay", "none", "--cache-path", "none", "--num-to-keep", "none"])
    job = resolve_job(config, flags)
    assert job.model.weights is None and job.model.unfreeze_after is None
    assert job.data.max_per_class is None and job.data.cache_path is None
    assert job.train.ema_decay is None and job.train.num_to_keep is None
    assert job.model.arch == "efficientnet_lite0" and job.model.freeze_backbone  # the rest still from the YAML


def optional_value_fields():
    return [(cls, f) for cls in CONFIG_CLASSES for f in fields(cls)
            if "Optional[" in str(f.type) and "bool" not in str(f.type)]


@pytest.mark.parametrize("cls,field", optional_value_fields(), ids=lambda x: getattr(x, "name", ""))
def test_every_optional_field_flag_takes_none(cls, field):
    command = "predict" if cls is PredictConfig else "train"
    param = next(p for p in cli.commands[command].params if p.name == field.name)
    assert isinstance(param.type, OrNone), field.name
    flags = parse(command, [f"--{field.name.replace('_', '-')}", "none"])
    assert flags[field.name] is NONE


def test_none_is_refused_where_a_value_is_required():
    result = CliRunner().invoke(cli, ["train", "--epochs", "none"])
    assert result.exit_code == 2 and "--epochs" in result.stderr


@pytest.fixture
def no_ray(monkeypatch):
    """Fails a test that would start Ray or begin the job's work."""
    import imgcls.cli

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(imgcls.cli, "init_ray_while_importing", refuse)
    monkeypatch.setattr(imgcls.cli, "init_ray", refuse)


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("weights", ["{tmp}/missing.pt", "memory://imgcls-tests/missing.safetensors", "DEFAULT"])
def test_missing_weights_file_fails_at_once_naming_it(command, weights, tmp_path, no_ray):
    weights = weights.format(tmp=tmp_path)
    result = CliRunner().invoke(cli, [command, "--root", str(tmp_path), "--weights", weights])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"imgcls {command}: error:") and weights in line and "--weights" in line


def test_monitor_checks_its_inputs_before_ray_starts(tmp_path, no_ray):
    """A wrong path, a file that holds no predictions, predictions without the embeddings
    asked for: one line naming the flag, the path and the problem, status 2, and Ray
    never started (``no_ray``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    predictions, other = str(tmp_path / "labels.parquet"), str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"path": ["a.png"], "status": ["ok"], "label": ["cat"], "score": [0.9]}), predictions)
    pq.write_table(pa.table({"path": ["a.png"]}), other)
    cases = [(["--reference", str(tmp_path / "missing"), "--current", predictions, "--embedding-sample", "0"],
              f"--reference {tmp_path / 'missing'}: no such file or folder"),
             (["--reference", predictions, "--current", other, "--embedding-sample", "0"],
              f"--current {other} holds no imgcls predictions: no Parquet with the column(s) status, label, score"),
             (["--reference", predictions, "--current", predictions],
              f"--reference {predictions} has no embeddings: label with --embeddings, or monitor with "
              "--embedding-sample 0")]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["monitor", *args, "--output", str(tmp_path / "drift")])
        assert result.exit_code == 2, result.output
        assert result.stderr == f"imgcls monitor: error: {message}\n"


def test_weights_that_need_no_file_pass_the_check(tmp_path):
    from imgcls.cli import check_weights

    state = tmp_path / "w.pt"
    state.write_bytes(b"x")
    for arch, weights in [("resnet18", "DEFAULT"), ("resnet18", "IMAGENET1K_V1"), ("efficientnet_lite0", "packaged"),
                          ("small_cnn", None), ("small_cnn", str(state))]:
        check_weights(ModelConfig(arch=arch, weights=weights))
    with pytest.raises(click.BadParameter, match="packaged"):
        check_weights(ModelConfig(arch="resnet18", weights="packaged"))


def test_user_errors_are_one_line_with_status_2(tmp_path):
    """A missing checkpoint (FileNotFoundError), an evaluation folder without predictions:
    one line naming the problem, status 2, no traceback; the traceback with --verbose."""
    cases = [["evaluate", "--model", str(tmp_path / "nope"), "--predictions", str(tmp_path), "--output",
              str(tmp_path / "eval")],
             ["explain", "--model", str(tmp_path / "nope"), "--mistakes-from", str(tmp_path), "--output",
              str(tmp_path / "cam")]]
    for args in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"imgcls {args[0]}: error: ")
        assert str(tmp_path) in result.stderr and "Traceback" not in result.stderr
        verbose = CliRunner().invoke(cli, ["--verbose", *args])
        assert verbose.exit_code == 2 and "Traceback" in verbose.stderr
        assert verbose.stderr.strip().splitlines()[-1] == result.stderr.strip()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import imgcls.evaluation.evaluate

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(imgcls.evaluation.evaluate, "worst_mistakes", broken)
    result = CliRunner().invoke(cli, ["explain", "--model", "m", "--mistakes-from", str(tmp_path), "--output",
                                      str(tmp_path / "cam")])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_library_user_errors_have_their_own_types(tmp_path):
    """The mistakes the CLI shows as one line are types of their own, still ValueErrors."""
    from imgcls.cli import user_error_types
    from imgcls.inference.inputs import OutputFolderError, plan_inputs

    (tmp_path / "out" / "_inputs").mkdir(parents=True)
    (tmp_path / "out" / "_inputs" / "_plan.json").write_text(json.dumps(
        {"input": "other", "files": 1, "shards": 1, "files_per_shard": 10, "sha256": "x", "source_stat": None}))
    with pytest.raises(OutputFolderError, match="holds the output of other inputs") as e:
        plan_inputs(str(tmp_path), str(tmp_path / "out"), 10)
    assert isinstance(e.value, ValueError) and isinstance(e.value, user_error_types())
    names = {t.__name__ for t in user_error_types()}
    assert {"ConfigError", "DataError", "RunFolderError", "OutputFolderError", "ManifestError",
            "FileNotFoundError"} <= names


def test_yaml_values_outside_the_choices_are_refused_by_flag_name(tmp_path):
    from imgcls.cli import resolve_job

    for section, key, value in [("data", "augment", "strong"), ("model", "arch", "resnet99"),
                                ("train", "schedule", "step")]:
        with pytest.raises(click.UsageError, match=f"--{key}: must be one of"):
            resolve_job(write_yaml(tmp_path, {section: {key: value}}), {})


def test_help_lists_the_choices_of_every_fixed_set(tmp_path):
    for command in ("train", "tune", "predict"):
        params = {p.name: p for p in cli.commands[command].params}
        for cls in CONFIG_CLASSES:
            for f in fields(cls):
                if f.name in params and "choices" in f.metadata:
                    assert isinstance(params[f.name].type, click.Choice), (command, f.name)
                    assert tuple(params[f.name].type.choices) == f.metadata["choices"]
    for command in ("train", "tune"):
        text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        assert "--augment [none|light|standard|trivialaugment|randaugment]" in text
        assert "--optimizer [sgd|adamw]" in text and "|resnet18|" in text and "--schedule [cosine|onecycle]" in text
        assert "--class-balance [none|loss|sampler]" in text
        assert "AUGMENTATIONS" not in text and "list_models" not in text and "OPTIMIZERS" not in text
    assert "--runtime [torch|onnxruntime]" in " ".join(CliRunner().invoke(cli, ["predict", "--help"]).output.split())


def test_config_model_names_are_the_registrys():
    from imgcls import config, models

    assert config.MODEL_NAMES == tuple(models.list_models())
    assert set(config.TORCHVISION_MODELS) == {n for n, s in models._MODELS.items() if s.torchvision_name}
    assert set(config.PACKAGED_WEIGHTS_MODELS) == {n for n, s in models._MODELS.items() if s.packaged_weights}


def test_cli_help_imports_neither_torch_nor_ray():
    code = ("import sys; from click.testing import CliRunner; from imgcls.cli import cli; "
            "r = CliRunner().invoke(cli, ['train', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def predictions_frame(rows):
    import pandas as pd

    return pd.DataFrame([{"path": p, "status": s, "label": label, "score": 0.9,
                          "topk_labels": [label, "x"] if label else [], "true_label": t} for p, s, label, t in rows])


def test_scorable_rows_leave_out_unknown_true_labels_and_say_so():
    from imgcls.labelled import DataError
    from imgcls.evaluation.evaluate import left_out_line, report_from_predictions, scorable_rows

    classes = ["cat", "dog"]
    df = predictions_frame([("a/cat/1.png", "ok", "cat", "cat"), ("a/dog/2.png", "ok", "cat", "dog"),
                            ("a/inbox/3.png", "ok", "dog", "inbox"), ("a/inbox/4.png", "ok", "dog", "inbox"),
                            ("a/cat/bad.png", "error", None, "cat")])
    kept, left_out = scorable_rows(df, classes)
    assert len(kept) == 3 and left_out == {"unknown_true_label": 2, "unknown_true_labels": {"inbox": 2}}
    report = {**report_from_predictions(kept, classes), **left_out}
    assert report["num_samples"] == 2 and report["errors"] == 1 and report["accuracy"] == 0.5
    line = left_out_line(report)
    assert "\n" not in line and "2 whose true label the model does not know ('inbox': 2)" in line and "1 error" in line
    inbox = predictions_frame([("a/inbox/3.png", "ok", "dog", "inbox"), ("a/inbox/c.png", "error", None, "inbox")])
    with pytest.raises(DataError, match="no row to score.*1 are error rows and 1 have a true label"):
        scorable_rows(inbox, classes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig
    from imgcls.models import create_model

    folder = str(tmp_path_factory.mktemp("ckpt"))
    torch.manual_seed(0)
    save_checkpoint(folder, create_model("small_cnn", 2), JobConfig(model=ModelConfig(image_size=28)), ["cat", "dog"],
                    history=[])
    return folder


def test_evaluate_predictions_scores_known_labels_and_fails_on_none(checkpoint, tmp_path, no_ray):
    """`evaluate --predictions` over a folder with unlabelled files (the demo's `inbox`):
    the rows the model can score are scored, the others counted (stderr, metrics.json);
    with none left, one line and status 2."""
    mixed = predictions_frame([("d/cat/1.png", "ok", "cat", None), ("d/dog/2.png", "ok", "cat", None),
                               ("d/inbox/3.png", "ok", "dog", None), ("d/inbox/bad.png", "error", None, None)])
    mixed.drop(columns="true_label").to_parquet(tmp_path / "mixed.parquet")
    result = CliRunner().invoke(cli, ["evaluate", "--model", checkpoint, "--predictions",
                                      str(tmp_path / "mixed.parquet"), "--output", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "1 whose true label the model does not know ('inbox': 1)" in result.stderr and "1 error" in result.stderr
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_samples"] == 2 and metrics["unknown_true_label"] == 1 and metrics["errors"] == 1
    inbox = mixed[mixed["path"].str.contains("inbox")].drop(columns="true_label")
    inbox.to_parquet(tmp_path / "inbox.parquet")
    result = CliRunner().invoke(cli, ["evaluate", "--model", checkpoint, "--predictions",
                                      str(tmp_path / "inbox.parquet"), "--output", str(tmp_path / "eval2")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("imgcls evaluate: error: no row to score") and "'inbox': 1" in result.stderr


@pytest.mark.parametrize("embeddings", [False, True])
def test_finished_check_expects_the_fingerprint_bulk_writes(embeddings):
    """``imgcls predict``'s completion check rebuilds ``_job.json`` without torch: it must
    be what ``bulk._fingerprint`` writes, or a finished job would never finish at once."""
    from imgcls.inference import bulk, finished
    from imgcls.inference.model_stage import ModelPayload
    from imgcls.inference.inputs import InputPlan

    plan = InputPlan(input="in", files=21, shards=2, files_per_shard=500, sha256="abc", uri="out/_inputs")
    payload = ModelPayload("torch", b"", ("a", "b"), 28, (0.5,) * 3, (0.5,) * 3, "0123456789abcdef")
    cfg = PredictConfig(model="m", input="in", output="out", files_per_shard=500, top_k=2, embeddings=embeddings)
    record = {"input": "in", "files": 21, "shards": 2, "files_per_shard": 500, "sha256": "abc", "source_stat": None}
    expected = json.loads(json.dumps(bulk._fingerprint(plan, payload, cfg), default=str))  # as _job.json holds it
    assert finished.fingerprint(record, payload.model_id, cfg) == expected


def test_root_given_more_than_once_lists_them_all(tmp_path, monkeypatch):
    from imgcls.cli import resolve_job

    monkeypatch.chdir(tmp_path)
    job = resolve_job(None, parse("train", ["--root", "old", "--root", "s3://b/new.csv"]))
    assert job.data.root == f"{tmp_path / 'old'},s3://b/new.csv"  # each made absolute or kept as a URI
    assert resolve_job(None, parse("train", ["--root", "one"])).data.root == str(tmp_path / "one")
    assert resolve_job(None, parse("train", [])).data.root == ""


def test_tune_search_is_random_or_optunas_tpe():
    from ray.tune.search.optuna import OptunaSearch

    from imgcls.training.tune import searcher

    assert searcher("random", 8, seed=0) is None
    tpe = searcher("optuna", 12, seed=0)
    assert isinstance(tpe, OptunaSearch) and tpe._sampler._n_startup_trials == 4  # a third of 12
    assert searcher("optuna", 3, seed=0)._sampler._n_startup_trials == 2
    with pytest.raises(ValueError, match="unknown search 'grid'"):
        searcher("grid", 4, seed=0)
    result = CliRunner().invoke(cli, ["tune", "--search", "bayes"])
    assert result.exit_code == 2 and "'bayes' is not one of 'random', 'optuna'" in result.output


def test_train_warms_no_task_worker_for_data_it_decodes_itself(tmp_path, monkeypatch):
    """`imgcls train` starts Ray task workers ahead of the decode only when the decode
    will run in them: not for local folders of up to IN_PROCESS_MAX_IMAGES images in all
    (hidden files and folders not counted), and always for a manifest or a store URI."""
    import imgcls.devices
    from imgcls.cli import decodes_here

    monkeypatch.setattr(imgcls.devices, "IN_PROCESS_MAX_IMAGES", 5)
    for folder, names in (("a/x", ["1.png", "2.jpg", "notes.txt"]), ("b/y", ["3.png", ".4.png"]),
                          ("b/.ipynb_checkpoints", ["5.png", "6.png", "7.png"])):
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert decodes_here(a) and decodes_here(f"{a},{b}")  # 2 + 1 images
    for name in ("8.png", "9.png", "10.png"):
        (tmp_path / "b" / "y" / name).write_bytes(b"")
    assert decodes_here(b) and not decodes_here(f"{a},{b}")  # 4 alone; 2 + 4 over the 5
    (tmp_path / "manifest.csv").write_text("path,label\n")
    assert not decodes_here(str(tmp_path / "manifest.csv")) and not decodes_here("s3://bucket/images")
