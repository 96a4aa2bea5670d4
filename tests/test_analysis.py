"""After the search: pick, report, export, register and use the winner.

The integration tests read the suite's shared real search on PneumoniaMNIST in float32 (tests/conftest.py,
started with the session), and a BreastMNIST trial trained in-process under CPU bf16 autocast (the path of
every GPU trial; about 10 s), logged as tune.py logs a search. Multi-class and multi-label winners, and
min-mode ranking, are searches logged by hand from `iterate_epochs` on in-memory toy data: the same
checkpoint and the same MLflow layout, no Ray.
"""

import argparse
import contextlib
import dataclasses
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import hide_the_export_extra, real_data, toy_dataset
from PIL import Image
from scipy import stats
from sklearn.metrics import roc_auc_score

import analysis.replay
import analysis.reproduction
import analysis.scoring
from analysis import best, export, model_files, predict, report, robustness, runs
from analysis.bootstrap import bootstrap_ci, metrics_with_ci
from analysis.calibration import calibrated, choose_threshold, expected_calibration_error, fit_temperature, nll
from analysis.predict import load_model
from analysis.replay import replay
from trainables.config import resolve_config
from trainables.data.datasets import ImageSet, load_dataset
from trainables.data.normalization import Normalization
from trainables.data.splits import train_val_indices
from trainables.errors import UserError
from trainables.tracking.mlflow_runs import flat_params, get_experiment_id, numeric_metrics
from trainables.tracking.names import PARENT, TAG_BEST_RUN, TAG_CHECKPOINT, TAG_OUTCOME, TAG_ROLE, TAG_SEARCH, TAG_TRIAL
from trainables.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from trainables.training.checkpoint import load_checkpoint, save_checkpoint
from trainables.training.epochs import iterate_epochs
from trainables.training.metrics import classification_metrics, predictions, probabilities
from trainables.training.split_run import build_model, eval_loader, predict_logits

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
integration = pytest.mark.integration  # reads the shared real search or trains on the real data
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

# One trial evaluated under bf16 autocast on the CPU: the same code path a CUDA trial takes (precision auto on a
# GPU). CPU bf16 is emulated on most CPUs (5-8x slower than float32 here), hence the small BreastMNIST (546
# training images); class weights keep the one-epoch model off the all-one-class answer.
BF16 = {"dataset": "breastmnist", "model": "simple_cnn", "epochs": 1, "batch_size": 16, "optimizer": "adam",
        "lr": 0.003, "schedule": "constant", "loss_weighting": "inverse", "split_ratio": 0.8,
        "precision": "bf16", "device": "cpu", "seed": 1}


def run_main(module, *argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def search(shared_search):
    """The suite's shared real search (tests/conftest.py): min mode on val_loss, some trials stopped or failed."""
    return shared_search


@pytest.fixture(scope="module")
def bf16_search(tmp_path_factory, medmnist_root, mlflow_store):
    """A real bf16 trial on BreastMNIST (the trial loop a Ray trial runs), logged as tune.py logs a search."""
    tmp = tmp_path_factory.mktemp("bf16")
    config = resolve_config({**BF16, "data_root": str(medmnist_root)})
    data = load_dataset("breastmnist", image_size=28, data_root=str(medmnist_root))
    *_, last = iterate_epochs(config, data)
    save_checkpoint(last.state, tmp / "checkpoint")
    uri = mlflow_store(tmp)
    log_search(uri, "bf16", [{"trial_id": "bf160001", "metrics": last.metrics, "params": {"lr": BF16["lr"]},
                              "checkpoint": tmp / "checkpoint"}],
               {"metric": "val_auc", "mode": "max", "params": {"lr": {"choice": [BF16["lr"]]}}})
    client = mlflow.MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("medtune").experiment_id],
                                "tags.`medtune.role` = 'search'")[0]
    return argparse.Namespace(tmp=tmp, uri=uri, client=client, parent=parent, name="bf16", data_root=medmnist_root,
                              winner=client.get_run(parent.data.tags["medtune.best_run_id"]))


@pytest.fixture(scope="module")
def exported(search):
    out = search.tmp / "export"
    code, stdout, stderr = run_main(export, "--search", search.name, "--tracking-uri", search.uri, "--out", out,
                                    "--n-resamples", 200, "--ensemble", 1)  # the single winner's files
    assert code == 0, stdout + stderr
    return out, stdout


def log_search(uri: str, name: str, trials: list[dict], space: dict | None, params: dict | None = None,
               best_index: int | None = 0) -> str:
    """A search laid out in MLflow as tune.py and its callback lay it out; returns the parent run id.

    `trials`: {"trial_id", "metrics", "params", "checkpoint" (dir or None)} each, all completed."""
    client = mlflow.MlflowClient(uri)
    experiment = get_experiment_id(client)
    parent = client.create_run(experiment, run_name=name, tags={TAG_SEARCH: name, TAG_ROLE: "search"}).info.run_id
    if space is not None:
        client.log_dict(parent, space, "search_space.yaml")
    client.log_batch(parent, params=flat_params(params or {}))
    for index, trial in enumerate(trials):
        tags = {PARENT: parent, TAG_SEARCH: name, TAG_ROLE: "trial", TAG_TRIAL: trial["trial_id"], TAG_OUTCOME: "completed"}
        if trial.get("checkpoint"):
            tags[TAG_CHECKPOINT] = str(trial["checkpoint"])
        run = client.create_run(experiment, run_name=trial["trial_id"], tags=tags).info.run_id
        client.log_batch(run, metrics=numeric_metrics(trial["metrics"], 1), params=flat_params(trial.get("params", {})))
        client.set_terminated(run)
        if index == best_index:
            client.set_tag(parent, TAG_BEST_RUN, run)
    client.set_terminated(parent)
    return parent


# --- export ----------------------------------------------------------------------------------------

@integration
def test_export_writes_weights_architecture_preprocessing_decision_and_card(search, exported):
    out, stdout = exported
    assert all((out / name).exists() for name in model_files.FILES)
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep | {"task": "binary", "class_names": ["normal", "pneumonia"], "image_size": 28, "channels": 1,
                   "mean": [0.5], "std": [0.5], "architecture": "model.json", "weights": "model.safetensors"} == prep
    assert json.loads((out / "model.json").read_text()) == {
        "format": predict.FORMAT, "name": "simple_cnn", "num_classes": 2, "in_chans": 1, "img_size": 28, "drop_rate": None,
        "drop_path_rate": None, "attn_drop_rate": None, "stem": "fixed"}
    # the temperature and the threshold are the ones the winner's validation split gives, recomputed here
    config = json.loads((out / "config.json").read_text())
    data = load_dataset("pneumoniamnist", image_size=28, data_root=str(search.data_root))
    _, val_index = train_val_indices(data, config["split_ratio"], config["seed"])
    val = data.dev.subset(val_index)
    logits, labels = predict_logits(load_model(out), eval_loader(val, 512, CPU), CPU)
    decision = json.loads((out / "decision.json").read_text())
    assert decision["temperature"] == fit_temperature(logits, labels, "binary") and decision["positive_class"] == "pneumonia"
    threshold, rule = choose_threshold(labels, calibrated(logits, "binary", decision["temperature"])[:, 1])
    assert (decision["threshold"], decision["threshold_rule"]) == (threshold, rule) and "Youden" in rule
    card = (out / "model_card.md").read_text()
    for section in ("## Data and splits", "## Test metrics", "## Decision threshold", "## Calibration",
                    "## Confusion matrices", "## Intended use and limits", "ECE before"):
        assert section in card
    assert "[" in card.split("## Test metrics")[1] and "(equal)" in card
    assert "0 of 624 test predictions flip" in card  # a float32 trial: the exported model is its own arithmetic
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert "reproduces the logged test metrics" in stdout and "MISMATCH" not in stdout
    onnx = json.loads((out / "metrics.json").read_text())["onnx"]  # model.onnx matches on the validation split
    assert onnx["ok"] and onnx["files"] == ["model.onnx"] and onnx["images"] == len(val_index)
    assert f"`model.onnx` (ONNX opset {onnx['opset']}, files `model.onnx`;" in card
    assert "model.onnx: matches the PyTorch model on the validation split" in stdout


@integration
def test_exported_model_and_torchscript_reproduce_the_logged_test_metrics(search, exported):
    out, _ = exported
    test = load_dataset("pneumoniamnist", image_size=28, data_root=str(search.data_root)).test
    shipped, labels = predict_logits(load_model(out), eval_loader(test, 512, CPU), CPU)
    traced, _ = predict_logits(torch.jit.load(str(out / "model.ts")), eval_loader(test, 512, CPU), CPU)
    for logits in (shipped, traced):
        metrics = classification_metrics("binary", labels, probabilities("binary", logits))
        assert metrics["acc"] == search.winner.data.metrics["test_acc"]
        assert abs(metrics["auc"] - search.winner.data.metrics["test_auc"]) <= 1e-6
    reproduced = json.loads((out / "metrics.json").read_text())["reproduced"]
    assert reproduced["exact"] and reproduced["trial"] == reproduced["replayed_on"] == {"device": "cpu", "precision": "fp32"}


@integration
def test_export_of_a_bf16_trial_replays_it_in_bf16_and_reports_the_flips(bf16_search, tmp_path):
    """A trial evaluated under bf16 autocast (what every GPU trial does) exports with exit 0: its replay in bf16
    reproduces the logged metrics exactly, and the float32 model's differences from it are counted."""
    code, stdout, stderr = run_main(export, "--robustness-images", 32,
                                    "--search", "bf16", "--tracking-uri", bf16_search.uri, "--out", tmp_path,
                                    "--n-resamples", 50)
    assert code == 0, stdout + stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    reproduced = metrics["reproduced"]
    assert reproduced["trial"] == reproduced["replayed_on"] == {"device": "cpu", "precision": "bf16"} and reproduced["exact"]
    logged = bf16_search.winner.data.metrics
    assert {k: v["replayed"] for k, v in reproduced["metrics"].items()} == {"acc": logged["test_acc"], "auc": logged["test_auc"]}
    # the flips and differences, recomputed: the exported weights under bf16 autocast vs in float32
    test = load_dataset("breastmnist", image_size=28, data_root=str(bf16_search.data_root)).test
    model = load_model(tmp_path)
    bf16, labels = predict_logits(model, eval_loader(test, 512, CPU), CPU, amp=True)
    fp32, _ = predict_logits(model, eval_loader(test, 512, CPU), CPU, amp=False)
    flips = int((predictions("binary", probabilities("binary", bf16))
                 != predictions("binary", probabilities("binary", fp32))).sum())
    change = metrics["precision_change"]
    assert change["flips"] == flips and change["n"] == len(test) == 156
    assert change["max_abs_logit_difference"] == pytest.approx(float(np.abs(bf16 - fp32).max()))
    assert change["max_abs_logit_difference"] > 0  # the replay did run in bf16
    for key in ("acc", "auc"):
        exported_value = classification_metrics("binary", labels, probabilities("binary", fp32))[key]
        replayed_value = classification_metrics("binary", labels, probabilities("binary", bf16))[key]
        assert change["metrics"][key]["replayed"] == replayed_value == logged[f"test_{key}"]
        assert change["metrics"][key]["exported"] == exported_value == metrics["test"]["argmax"][key]["value"]
        assert change["metrics"][key]["difference"] == pytest.approx(exported_value - replayed_value)
    line = f"{flips} of 156 test predictions flip between cpu bf16 and the exported float32 model"
    assert line in stdout and line in (tmp_path / "model_card.md").read_text()


@integration
def test_threshold_and_temperature_are_fitted_on_validation_only(search, exported, monkeypatch, tmp_path):
    """The fit receives exactly the winner's validation split; scrambling the test split changes nothing."""
    real = load_dataset("pneumoniamnist", image_size=28, data_root=str(search.data_root))
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(real, test=ImageSet(real.test.images[::-1].copy(), rng.permutation(real.test.labels)))
    monkeypatch.setattr(analysis.replay, "load_dataset", lambda *a, **k: scrambled)
    seen = []

    def spy(val_logits, val_labels, *args, **kwargs):
        seen.append(val_labels.copy())
        return fit_decision(val_logits, val_labels, *args, **kwargs)

    fit_decision = analysis.scoring.fit_decision
    monkeypatch.setattr(analysis.scoring, "fit_decision", spy)
    hide_the_export_extra(monkeypatch)  # not about ONNX: no model.onnx, no cost
    code, stdout, stderr = run_main(export, "--robustness-images", 32,
                                    "--search", search.name, "--tracking-uri", search.uri, "--out", tmp_path,
                                    "--n-resamples", 50, "--ensemble", 1)
    assert code == 1 and "does not reproduce" in stderr  # the test labels were scrambled, so test scores moved...
    config = json.loads((exported[0] / "config.json").read_text())
    _, val_index = train_val_indices(real, config["split_ratio"], config["seed"])
    assert len(seen) == 1 and np.array_equal(seen[0], real.dev.labels[val_index])
    # ...but the threshold and the temperature did not move at all
    assert json.loads((tmp_path / "decision.json").read_text()) == json.loads((exported[0] / "decision.json").read_text())


# --- user errors: one line, exit 2 -------------------------------------------------------------------

@integration
def test_a_checkpoint_that_is_not_ours_is_refused_with_one_line(search, tmp_path):
    torch.save({"weights": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "checkpoint.pt")
    code, stdout, stderr = run_main(export, "--search", search.name, "--tracking-uri", search.uri, "--out", tmp_path / "x",
                                    "--checkpoint", tmp_path)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ") and "not a medtune checkpoint" in stderr
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")  # loadable, but no medtune format marker
    code, _, stderr = run_main(export, "--search", search.name, "--tracking-uri", search.uri, "--out", tmp_path / "x",
                               "--checkpoint", tmp_path)
    assert code == 2 and f"format {CHECKPOINT_FORMAT} expected" in stderr and stderr.count("\n") == 1


@integration
def test_missing_checkpoint_and_unfinished_search_are_one_line_each(search, tmp_path):
    code, _, stderr = run_main(export, "--search", search.name, "--tracking-uri", search.uri, "--out", tmp_path,
                               "--checkpoint", tmp_path / "gone")
    assert code == 2 and stderr.startswith("error: No checkpoint at") and stderr.count("\n") == 1
    log_search(search.uri, "unfinished", [], {"metric": "val_auc", "mode": "max", "params": {}},
               {"metric": "val_auc", "mode": "max"}, best_index=None)  # as tune.py leaves a search killed early
    for module in (export, best, report):
        code, _, stderr = run_main(module, "--search", "unfinished", "--tracking-uri", search.uri, "--out", tmp_path) \
            if module is not best else run_main(module, "--search", "unfinished", "--tracking-uri", search.uri)
        assert code == 2 and "'unfinished' has no" in stderr and "tune.py --resume unfinished" in stderr, stderr


@integration
@pytest.mark.parametrize("module", [export, best, report])
def test_unknown_search_is_one_line_naming_the_fix(search, tmp_path, module):
    extra = ["--out", tmp_path] if module is not best else []
    code, _, stderr = run_main(module, "--search", "no-such-search", "--tracking-uri", search.uri, *extra)
    assert code == 2 and stderr.count("\n") == 1 and "No search 'no-such-search'" in stderr and "--tracking-uri" in stderr


# --- predict ----------------------------------------------------------------------------------------

@integration
def test_predict_prints_label_and_probabilities_for_kermany_jpegs(exported, tmp_path):
    out, _ = exported
    images = sorted(real_data("chest_xray/test/NORMAL").glob("*.jpeg"))[:2] + \
        sorted(real_data("chest_xray/test/PNEUMONIA").glob("*.jpeg"))[:1]
    code, stdout, stderr = run_main(predict, "--model", out, *images)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    threshold = json.loads((out / "decision.json").read_text())["threshold"]
    for line, image in zip(lines, images):
        path, label, probs = line.split("\t")
        values = {name: float(p) for name, p in (item.split("=") for item in probs.split())}
        assert path == str(image) and set(values) == {"normal", "pneumonia"}
        assert abs(sum(values.values()) - 1) < 1e-3  # printed to 4 decimals
        assert label == ("pneumonia" if values["pneumonia"] >= threshold else "normal")  # the validation threshold
    (tmp_path / "broken.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, stdout, stderr = run_main(predict, "--model", out, str(images[0]), str(tmp_path / "broken.jpeg"))
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "broken.jpeg" in stderr


@integration
def test_predict_classifies_a_real_png_and_its_dicom_alike_and_runtime_onnx_gives_the_same_labels(exported, tmp_path):
    """A Kermany X-ray as an 8-bit PNG and as an 8-bit MONOCHROME2 DICOM of the same pixels: the same probabilities;
    onnxruntime (model.onnx) gives the labels and, within the stated tolerance, the probabilities of PyTorch (~3 s)."""
    from test_image_files import dicom

    out, _ = exported
    sources = sorted(real_data("chest_xray/test/NORMAL").glob("*.jpeg"))[:2] + \
        sorted(real_data("chest_xray/test/PNEUMONIA").glob("*.jpeg"))[:2]
    pngs, dicoms = [], []
    for index, source in enumerate(sources):
        pixels = np.asarray(Image.open(source).convert("L"))
        pngs.append(tmp_path / f"{index}.png")
        Image.fromarray(pixels).save(pngs[-1])
        dicoms.append(dicom(tmp_path / f"{index}.dcm", pixels))
    outputs = {}
    for key, argv in {"png": pngs, "dicom": dicoms, "onnx": ["--runtime", "onnx", *pngs, *dicoms]}.items():
        code, stdout, stderr = run_main(predict, "--model", out, "--json", *argv)
        assert code == 0, stderr
        outputs[key] = [json.loads(line) for line in stdout.splitlines()]
    assert [row["probabilities"] for row in outputs["dicom"]] == [row["probabilities"] for row in outputs["png"]]
    torch_rows = outputs["png"] + outputs["dicom"]
    assert [row["label"] for row in outputs["onnx"]] == [row["label"] for row in torch_rows]
    assert len({row["label"] for row in torch_rows}) == 2  # both classes among the answers: the labels can differ
    tolerance = json.loads((out / "metrics.json").read_text())["onnx"]["tolerance"]
    assert max(abs(row["probabilities"][n] - twin["probabilities"][n]) for row, twin in zip(outputs["onnx"], torch_rows)
               for n in row["probabilities"]) <= tolerance


# --- best and report ---------------------------------------------------------------------------------

@integration
def test_best_lists_top_trials_by_validation_with_test_cis(search):
    code, stdout, stderr = run_main(best, "--search", search.name, "--tracking-uri", search.uri, "--n-resamples", 100)
    assert code == 0, stderr
    header, first, *rest = stdout.splitlines()[1:]
    assert "best_val_loss" in header and "test_auc" in header  # the shared search minimises validation loss
    assert "*" in first and search.winner.data.tags["medtune.trial_id"] in first  # the winner ranks first
    assert first.count("[") >= 4 and f"{search.winner.data.metrics['test_acc']:.4f}" in first
    assert first.split().count(f"{search.winner.data.metrics['test_acc']:.3f}") >= 1  # the re-scored acc = logged
    completed = [t for t in search.trials if t.data.tags.get("medtune.outcome") == "completed"]
    assert len(rest) == min(len(completed), 5) - 1
    column = header.split().index("best_val_loss")
    scores = [float(line.split()[column + (1 if "*" in line.split() else 0)]) for line in [first, *rest]]
    assert scores == sorted(scores)  # min mode: lowest first


@integration
def test_report_writes_tables_importance_and_plots_and_logs_them(search, tmp_path):
    code, stdout, stderr = run_main(report, "--search", search.name, "--tracking-uri", search.uri, "--out", tmp_path)
    assert code == 0, stderr
    assert {"trials.csv", "tables.md", "importance.csv", "importance.png", "metric_vs_params.png"} <= \
        {p.name for p in tmp_path.iterdir()}
    tables = (tmp_path / "tables.md").read_text()
    assert "fANOVA" in tables and "test_acc by lr" in tables and "fANOVA importance for best_val_loss" in stdout
    logged = {a.path for a in search.client.list_artifacts(search.parent.info.run_id, "report")}
    assert "report/tables.md" in logged and "report/metric_vs_params.png" in logged


# --- multi-class and multi-label winners, GPU trials, min-mode ranking: searches logged by hand --------

TOY = {"dataset": "imagefolder:/toy", "image_size": 16, "model": "simple_cnn", "epochs": 3, "batch_size": 32,
       "lr": 3e-3, "split_ratio": 0.75, "skip_bad_images": True, "device": "cpu", "precision": "fp32", "seed": 0}


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory, mlflow_store) -> str:
    """One MLflow store for the hand-logged searches."""
    return mlflow_store(tmp_path_factory.mktemp("toy_store"))


def toy_winner(tmp_path, monkeypatch, task: str, uri: str | None = None, config: dict | None = None, data=None,
               **state_changes) -> argparse.Namespace:
    """A one-trial search on toy data (`data`, else `toy_dataset(task)`): real `iterate_epochs` checkpoint and
    metrics, logged as tune.py does (when `uri` is given); replay's dataset loader answers with the toy data (and
    records how it was asked)."""
    data = data if data is not None else toy_dataset(task, n_dev=200, n_test=80)
    *_, last = iterate_epochs(resolve_config(TOY | (config or {})), data)
    state = {**last.state, **state_changes}
    save_checkpoint(state, tmp_path / "checkpoint")
    name = f"toy-{tmp_path.name}"
    if uri is not None:
        # searched as a space with variants searches: the trial's config names its variant, expanded by the trainable
        log_search(uri, name, [{"trial_id": "toy00001", "metrics": last.metrics,
                                "params": {"lr": TOY["lr"], "variant": "small_cnn"}, "checkpoint": tmp_path / "checkpoint"}],
                   {"metric": "val_auc", "mode": "max", "params": {"lr": {"choice": [TOY["lr"]]}},
                    "variants": {"small_cnn": {"model": TOY["model"]}}})
    asked = []
    monkeypatch.setattr(analysis.replay, "load_dataset", lambda spec, **kwargs: asked.append((spec, kwargs)) or data)
    return argparse.Namespace(uri=uri, name=name, data=data, metrics=last.metrics, state=state, asked=asked)


def write_pngs(images: np.ndarray, folder: Path) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"{i}.png" for i in range(len(images))]
    for image, path in zip(images, paths):
        Image.fromarray(image[..., 0], mode="L").save(path)
    return paths


@pytest.mark.parametrize(("task", "normalize"), [("multiclass", "dataset"), ("multilabel", "mean_image")])
def test_export_and_predict_a_multiclass_and_a_multilabel_winner(task, normalize, tmp_path, monkeypatch, toy_store):
    """Both also carry a normalisation other than [-1, 1] through export to predict (per channel, per pixel). The
    multi-label export writes and checks model.onnx (sigmoid per label, a per-pixel mean); the multi-class one runs
    without the ONNX packages (tests/test_onnx.py covers softmax), which saves the suite ~2 s."""
    if task == "multiclass":
        hide_the_export_extra(monkeypatch)
    toy = toy_winner(tmp_path, monkeypatch, task, toy_store, {"normalize": normalize})
    out = tmp_path / "export"
    code, stdout, stderr = run_main(export, "--robustness-images", 32, "--search", toy.name, "--tracking-uri", toy.uri, "--out", out,
                                    "--n-resamples", 50)
    assert code == 0, stdout + stderr
    # replay loaded the trial's images and split: skip_bad_images and split_version come from its config
    assert toy.asked == [("imagefolder:/toy", {"image_size": 16, "data_root": None, "skip_bad_images": True,
                                               "split_version": resolve_config({})["split_version"]})]
    metrics = json.loads((out / "metrics.json").read_text())
    names = list(toy.data.class_names)
    assert metrics["test"]["argmax"]["acc"]["value"] == toy.metrics["test_acc"] > 0.6  # learnt, and reproduced
    assert metrics["test"]["argmax"]["auc"]["value"] == pytest.approx(toy.metrics["test_auc"], abs=1e-12)
    assert metrics["reproduced"]["exact"] and metrics["reproduced"]["ok"]
    assert metrics["precision_change"]["flips"] == 0 and metrics["precision_change"]["max_abs_logit_difference"] == 0
    assert ("label_flips" in metrics["precision_change"]) == (task == "multilabel")
    assert json.loads((out / "model.json").read_text())["num_classes"] == 3
    prep = json.loads((out / "preprocessing.json").read_text())
    assert (prep["task"], prep["class_names"], prep["image_size"], prep["normalize"]) == (task, names, 16, normalize)
    assert (out / "mean_image.safetensors").exists() == (normalize == "mean_image")
    decision = json.loads((out / "decision.json").read_text())
    # the temperature is the one the winner's validation split gives, recomputed here from the exported weights
    trial_inputs = Normalization.from_meta(toy.state["dataset"])  # as the trial prepared its images
    assert trial_inputs.name == normalize
    _, val_index = train_val_indices(toy.data, TOY["split_ratio"], TOY["seed"])
    val_logits, val_labels = predict_logits(load_model(out), eval_loader(toy.data.dev.subset(val_index), 512, CPU,
                                                                          trial_inputs), CPU)
    assert decision["threshold"] is None
    assert decision["temperature"] == pytest.approx(fit_temperature(val_logits, val_labels, task), rel=1e-6)
    # the card names the winner's searched values, its variant (the architecture) included
    assert metrics["searched"] == {"lr": TOY["lr"], "variant": "small_cnn"}
    assert f"Searched values: lr={TOY['lr']}, variant=small_cnn." in (out / "model_card.md").read_text()
    assert metrics["onnx"]["ok"] if task == "multilabel" else "skipped" in metrics["onnx"]

    # predict on PNG files of test images: the exported model's calibrated probabilities and labels
    images = toy.data.test.images[:6]
    paths = write_pngs(images, tmp_path / "images")
    code, stdout, stderr = run_main(predict, "--model", out, "--json", *paths)
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    with torch.no_grad():
        logits = load_model(out)(trial_inputs(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()
    expected = calibrated(logits, task, decision["temperature"])
    assert np.allclose([[row["probabilities"][n] for n in names] for row in rows], expected, atol=1e-6)
    chosen = predictions(task, expected)
    wanted = ["+".join(n for n, on in zip(names, row) if on) or "(none)" for row in chosen] if task == "multilabel" \
        else [names[i] for i in chosen]
    assert [row["label"] for row in rows] == wanted

    # predict never executes the folder's TorchScript: garbage or no model.ts, the same answers
    (out / "model.ts").write_bytes(b"PK\x03\x04 this is not a TorchScript archive")
    assert run_main(predict, "--model", out, "--json", *paths)[1] == stdout
    (out / "model.ts").unlink()
    assert run_main(predict, "--model", out, "--json", *paths)[1] == stdout
    # and builds only what medtune's registry knows
    spec = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**spec, "name": "os.system"}))
    code, _, stderr = run_main(predict, "--model", out, *paths)
    assert code == 2 and "Unknown model 'os.system'" in stderr and stderr.count("\n") == 1


def test_a_frozen_backbone_checkpoint_from_before_frozen_batchnorm_exports_and_loads_strictly(tmp_path, monkeypatch,
                                                                                                toy_store,
                                                                                                without_the_export_extra):
    """freeze_backbone now freezes BatchNorm as FrozenBatchNorm2d (no num_batches_tracked). A trial checkpoint with
    BatchNorm's keys, as written before, replays and exports exactly, and predict loads the export strictly into
    the plain network it builds (~15 s; without the ONNX packages, whose ResNet-18 export is not this test's
    business and would add ~5 s)."""
    toy = toy_winner(tmp_path, monkeypatch, "binary", toy_store, {"model": "resnet18", "freeze_backbone": True, "epochs": 1})
    old = {key: {**weights, **{name.replace("running_mean", "num_batches_tracked"): torch.tensor(7)
                               for name in weights if name.endswith("running_mean")}}
           for key, weights in toy.state.items() if key in ("model", "best_model") and weights is not None}
    assert old and all(sum(name.endswith("num_batches_tracked") for name in w) == 20 for w in old.values())
    save_checkpoint({**toy.state, **old}, tmp_path / "checkpoint")  # where the search's trial run points
    out = tmp_path / "export"
    code, stdout, stderr = run_main(export, "--robustness-images", 32, "--search", toy.name, "--tracking-uri", toy.uri, "--out", out,
                                    "--n-resamples", 20)
    assert code == 0, stdout + stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reproduced"]["exact"] and metrics["test"]["argmax"]["auc"]["value"] == toy.metrics["test_auc"]
    exported, trial = load_model(out), replay(load_checkpoint(tmp_path / "checkpoint")).model
    images = torch.from_numpy(toy.data.test.images[:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(exported(images), trial(images), atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the replay of a GPU trial where no GPU is visible")
def test_a_gpu_bf16_trial_exports_on_a_cpu_within_the_stated_tolerance(tmp_path, monkeypatch, toy_store,
                                                                       without_the_export_extra):
    """A checkpoint that says cuda + bf16, exported on a machine without a GPU: replayed in CPU bf16 autocast,
    compared within the stated tolerance (not exactly), and the export goes through (model.onnx left out: not
    this test's business)."""
    toy = toy_winner(tmp_path, monkeypatch, "multiclass", toy_store, device="cuda", precision="bf16")
    code, stdout, stderr = run_main(export, "--robustness-images", 32,
                                    "--search", toy.name, "--tracking-uri", toy.uri, "--out", tmp_path / "out",
                                    "--n-resamples", 20)
    assert code == 0, stdout + stderr
    reproduced = json.loads((tmp_path / "out" / "metrics.json").read_text())["reproduced"]
    assert reproduced["trial"] == {"device": "cuda", "precision": "bf16"}
    assert reproduced["replayed_on"] == {"device": "cpu", "precision": "bf16"} and not reproduced["exact"]
    assert {k: v["tolerance"] for k, v in reproduced["metrics"].items()} == {"acc": 2 / 80, "auc": 0.005}
    assert "match within" in stdout and "trial: cuda bf16" in stdout


def hand_export(folder: Path, task: str = "multiclass") -> Path:
    """An export folder written by the export's own file writers around a fresh toy network (no search, < 1 s)."""
    from trainables.models import create_model

    folder.mkdir()
    spec = predict.Architecture(name="simple_cnn", num_classes=3, in_chans=1, img_size=16)
    torch.manual_seed(0)
    model_files.save_weights(create_model("simple_cnn", num_classes=3, in_chans=1, img_size=16), spec, folder)
    rep = argparse.Namespace(dataset=argparse.Namespace(channels=1, task=task, class_names=("a", "b", "c")),
                             normalization=Normalization("half", torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 0.5)),
                             config={"dataset": "imagefolder:/toy"})
    prep = model_files.preprocessing({"dataset": {"image_size": 16}}, rep, folder)
    (folder / "preprocessing.json").write_text(json.dumps(prep))
    (folder / "decision.json").write_text(json.dumps({"temperature": 1.5, "threshold": None}))
    return folder


def test_predict_reads_and_classifies_batch_size_images_at_a_time(tmp_path, monkeypatch):
    """A folder of any size: no forward pass sees more than --batch-size images, and the answers are those of one
    batch of everything; the CLI prints each batch before reading the next."""
    folder = hand_export(tmp_path / "export")
    paths = write_pngs(toy_dataset("multiclass").test.images[:7], tmp_path / "images")
    whole = predict.ExportedModel(folder).predict(paths, batch_size=len(paths))
    seen = []
    real_load = predict.load_model

    def spied(path):
        model = real_load(path)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
        return model

    monkeypatch.setattr(predict, "load_model", spied)
    batched = predict.ExportedModel(folder).predict(paths, batch_size=3)
    assert seen == [3, 3, 1] and batched[1] == whole[1] and np.allclose(batched[0], whole[0], atol=1e-6)
    read = []
    monkeypatch.setattr(predict.ExportedModel, "tensor", lambda self, p, real=predict.ExportedModel.tensor:
                        read.append((p, len(seen))) or real(self, p))
    seen.clear()
    code, stdout, _ = run_main(predict, "--model", folder, "--json", "--batch-size", 2, *paths)
    assert code == 0 and seen == [2, 2, 2, 1] and [json.loads(line)["label"] for line in stdout.splitlines()] == whole[1]
    assert [passes for _, passes in read] == [0, 0, 1, 1, 2, 2, 3]  # each file read only when its batch runs
    code, _, stderr = run_main(predict, "--model", folder, "--batch-size", 0, *paths)
    assert code == 2 and "--batch-size 0" in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize(("spec", "said"), [
    ("pneumoniamnist", "none in training: the MedMNIST file pneumoniamnist_64.npz holds the images at 64 x 64 px"),
    ("imagefolder:/data/chest_xray", "bilinear, to image_size x image_size, aspect ratio not kept (trainables.data.image_cache)")])
def test_preprocessing_says_how_the_training_images_were_sized(spec, said, tmp_path):
    """MedMNIST images come at their size in the npz file (nothing resized them); folder images were resized by the
    image cache. preprocessing.json says which."""
    rep = argparse.Namespace(dataset=argparse.Namespace(channels=1, task="binary", class_names=("normal", "pneumonia")),
                             normalization=Normalization("half", torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 0.5)),
                             config={"dataset": spec})
    prep = model_files.preprocessing({"dataset": {"image_size": 64}}, rep, tmp_path)
    assert prep["resize"].startswith(said) and prep["image_size"] == 64


def test_replay_refuses_a_checkpoint_without_the_best_weights(monkeypatch):
    data, config = toy_dataset("multiclass"), resolve_config(TOY)
    monkeypatch.setattr(analysis.replay, "load_dataset", lambda spec, **kwargs: data)
    weights = build_model(config, data).state_dict()
    final = {"config": config, "epoch": 3, "best_epoch": 2, "final": True, "model": weights}  # final: the best weights
    assert torch.equal(replay(final).model.state_dict()["head.1.weight"], weights["head.1.weight"])
    with pytest.raises(UserError, match="does not hold the best-validation weights"):
        replay({**final, "final": False})  # epoch 3's weights only: never used in place of epoch 2's


def test_replay_scores_in_the_batches_the_trial_evaluated_in(monkeypatch):
    """Same batches as the trial: its arithmetic (the exact-reproduction check), and its memory (a fixed 512 needs
    6.7 GiB for a small CNN at 224 px). A checkpoint from before the batch was recorded evaluated at 512."""
    data = toy_dataset()
    config = resolve_config({**TOY, "epochs": 1, "batch_size": 24})
    (epoch,) = iterate_epochs(config, data)
    monkeypatch.setattr(analysis.replay, "load_dataset", lambda spec, **kwargs: data)
    batches = []

    def spied(images, batch, *args, **kwargs):
        batches.append(batch)
        return eval_loader(images, batch, *args, **kwargs)

    monkeypatch.setattr(analysis.replay, "eval_loader", spied)
    rep = replay(epoch.state)
    logits, _ = rep.trial_logits(data.test)
    rep.logits(rep.model, data.test)
    assert batches == [24, 24]
    assert np.allclose(probabilities("binary", logits), epoch.test_probs, atol=1e-6)
    older = {key: value for key, value in epoch.state.items() if key != "eval_batch"}
    replay(older).trial_logits(data.test)
    assert batches[-1] == 512


def test_precision_change_counts_flipped_predictions_and_metric_moves():
    setting = analysis.replay.Setting("cuda", "bf16")
    binary = argparse.Namespace(dataset=argparse.Namespace(task="binary", class_names=("no", "yes")),
                                replayed=setting, fp32_is_trial=False)
    labels = np.array([0, 1, 1, 0])
    trial = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    exported = np.array([[0.0, -1.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0]])  # images 0 and 2 change class
    change = analysis.reproduction.precision_change(trial, exported, labels, binary, {"test_acc": 0.5})
    assert (change["flips"], change["flipped_test_indices"], change["n"]) == (2, [0, 2], 4)
    assert change["metrics"]["acc"] == {"exported": 1.0, "replayed": 0.5, "logged": 0.5, "difference": 0.5}
    assert change["max_abs_logit_difference"] == 2.0 and change["from"] == "cuda bf16" and "label_flips" not in change
    multilabel = argparse.Namespace(dataset=argparse.Namespace(task="multilabel", class_names=("a", "b", "c")),
                                    replayed=setting, fp32_is_trial=False)
    trial = np.array([[1.0, 1.0, -1.0], [-1.0, -1.0, -1.0], [1.0, -1.0, 1.0]])
    exported = np.array([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [1.0, -1.0, 1.0]])  # image 0: two labels flip
    change = analysis.reproduction.precision_change(trial, exported, np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]]), multilabel, {})
    assert (change["flips"], change["label_flips"], change["flipped_test_indices"]) == (1, 2, [0])
    assert "1 of 3 test predictions flip (2 label decisions) between cuda bf16" in analysis.reproduction.change_text(change)


def test_a_min_mode_search_ranks_the_lowest_score_first(monkeypatch, toy_store):
    uri = toy_store
    losses = {"trial_a": 0.30, "trial_b": 0.10, "trial_c": 0.20}
    trials = [{"trial_id": t, "metrics": {"best_val_loss": v, "test_acc": 0.9 - v}, "params": {"lr": v / 10}}
              for t, v in losses.items()]
    space = {"metric": "val_loss", "mode": "min", "params": {"lr": {"choice": [0.01, 0.02, 0.03]}}}
    log_search(uri, "lossy", trials, space, {"metric": "val_loss", "mode": "min"}, best_index=1)
    log_search(uri, "lossy-no-yaml", trials, None, {"metric": "val_loss", "mode": "min"}, best_index=1)

    def order(search):
        code, stdout, stderr = run_main(best, "--search", search, "--tracking-uri", uri, "--no-ci")
        assert code == 0, stderr
        return [line.split()[1] for line in stdout.splitlines()[2:]]

    assert order("lossy") == order("lossy-no-yaml") == ["trial_b", "trial_c", "trial_a"]  # best_val_loss ascending
    assert "trial_b *" in run_main(best, "--search", "lossy", "--tracking-uri", uri, "--no-ci")[1]

    # without the space file and without a logged mode, the direction is unknown: an error, never a guess
    log_search(uri, "no-mode", trials, None, {"metric": "val_loss"}, best_index=1)
    code, _, stderr = run_main(best, "--search", "no-mode", "--tracking-uri", uri, "--no-ci")
    assert code == 2 and "no metric/mode params" in stderr and stderr.count("\n") == 1
    parent = log_search(uri, "damaged", trials, None, {"metric": "val_loss", "mode": "min"}, best_index=1)
    mlflow.MlflowClient(uri).log_text(parent, "metric: [val_loss\nmode: min", "search_space.yaml")
    code, _, stderr = run_main(best, "--search", "damaged", "--tracking-uri", uri, "--no-ci")
    assert code == 2 and "not valid YAML" in stderr and stderr.count("\n") == 1

    # an artifact store that fails (not "no such artifact") is an error naming its cause, chained
    client = runs.connect(uri)
    failure = OSError("connection reset by peer")
    monkeypatch.setattr(client, "download_artifacts", lambda *a, **k: (_ for _ in ()).throw(failure))
    with pytest.raises(UserError, match="connection reset by peer") as caught:
        runs.search_space(client, runs.get_search(client, "lossy"))
    assert caught.value.__cause__ is failure


# --- the statistics, on known cases ------------------------------------------------------------------

def test_bootstrap_ci_of_a_proportion_matches_the_normal_approximation():
    correct = np.r_[np.ones(800), np.zeros(200)]  # accuracy 0.8 on 1,000 cases
    low, high = bootstrap_ci(np.mean, correct, n_resamples=4000)
    half = stats.norm.ppf(0.975) * np.sqrt(0.8 * 0.2 / 1000)  # Wald interval: 0.8 +- 0.0248
    assert abs(low[0] - (0.8 - half)) < 0.004 and abs(high[0] - (0.8 + half)) < 0.004
    assert [float(v[0]) for v in bootstrap_ci(np.mean, np.ones(50), n_resamples=100)] == [1.0, 1.0]


def test_bootstrap_ci_of_auc_matches_hanley_mcneil_and_scipy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 600)
    score = np.clip(0.3 * labels + 0.7 * rng.random(600), 0, 1)
    probs = np.c_[1 - score, score]
    cis = metrics_with_ci("binary", labels, probs, n_resamples=400)
    auc, n1, n0 = roc_auc_score(labels, score), labels.sum(), (1 - labels).sum()
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n0 - 1) * (q2 - auc ** 2)) / (n1 * n0))
    assert cis["auc"]["value"] == auc and cis["acc"]["value"] == classification_metrics("binary", labels, probs)["acc"]
    assert abs(cis["auc"]["low"] - (auc - 1.96 * se)) < 0.01 and abs(cis["auc"]["high"] - (auc + 1.96 * se)) < 0.01
    direct = stats.bootstrap((np.arange(600),), lambda rows: roc_auc_score(labels[rows], score[rows]), paired=True,
                             vectorized=False, n_resamples=400, method="percentile", rng=np.random.default_rng(0))
    assert np.isclose(cis["auc"]["low"], direct.confidence_interval.low)


def test_temperature_recovers_a_known_temperature_and_threshold_rules():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in probabilities("multiclass", true_logits)])
    t = fit_temperature(true_logits * 2.5, labels, "multiclass")  # over-confident by 2.5x
    assert abs(t - 2.5) < 0.15 and nll(true_logits * 2.5, labels, "multiclass", t) < nll(true_logits * 2.5, labels, "multiclass")
    probs = probabilities("multiclass", true_logits)
    assert expected_calibration_error(labels, probs, "multiclass") < 0.03
    assert expected_calibration_error(labels, probabilities("multiclass", true_logits * 2.5), "multiclass") > 0.05
    y, p = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0.1, 0.2, 0.6, 0.65, 0.4, 0.7, 0.8, 0.9])
    assert choose_threshold(y, p)[0] == 0.7  # Youden's J: sensitivity 3/4 + specificity 1 - 1 beats 1 + 1/2 - 1
    assert choose_threshold(y, p, target_sensitivity=1.0)[0] == 0.4


# --- robustness of the exported winner (analysis.robustness; subgroups: tests/test_subgroups.py) ----------

@integration
def test_exported_card_reports_robustness_that_falls_with_severity(search, exported):
    """The shared search's winner (a 2-epoch CNN on PneumoniaMNIST) as exported: severity 0 is the clean test
    score, and on average over the corruptions the harshest severity scores a lower AUC than the mildest. Cost: the
    export's 31 passes over 624 images (a few seconds of the module's export fixture), then reading files."""
    out, stdout = exported
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["robustness"]
    table = report["table"]
    assert list(table) == list(robustness.CORRUPTIONS) and all(len(rows) == 6 for rows in table.values())
    logits, labels, _ = exported_test_logits(out, search)
    clean = robustness.figures("binary", labels, logits, json.loads((out / "decision.json").read_text()))
    assert all(rows[0]["auc"] == clean["auc"] and rows[0]["acc"] == clean["acc"] for rows in table.values())
    harsh, mild = np.mean([rows[5]["auc"] for rows in table.values()]), np.mean([rows[1]["auc"] for rows in table.values()])
    assert harsh < mild < clean["auc"] + 0.01
    assert report["mean_relative_drop"]["auc"] > 0
    card = (out / "model_card.md").read_text()
    assert "## Robustness to image corruptions" in card and f"| gaussian_noise | {clean['auc']:.3f} / " in card
    assert (out / robustness.PLOT).stat().st_size > 10_000 and f"]({robustness.PLOT})" in card
    assert "## Subgroups\n\nNot reported: the dataset carries no per-image attributes" in card  # MedMNIST has none
    assert "robustness: mean relative drop under corruption: AUC" in stdout


def exported_test_logits(out, search):
    """(logits, labels, replay) of the exported model on the winner's test split."""
    rep = replay(runs.checkpoint_state(search.winner))
    return (*analysis.replay.logits_of(load_model(out), rep.test, rep.normalization), rep)


@integration
def test_severity_zero_leaves_the_predictions_of_a_real_model_unchanged(search, exported):
    """Severity 0 goes through each corruption's code path (tensor round trip, the neutral parameter) and must
    give the clean predictions exactly. Cost: 9 passes of the exported CNN over 624 images; about 2 s."""
    out, _ = exported
    clean_logits, _, rep = exported_test_logits(out, search)
    model = load_model(out)
    for name in robustness.CORRUPTIONS:
        images = dataclasses.replace(rep.test, images=robustness.corrupt(rep.test.images, name, 0))
        assert np.array_equal(analysis.replay.logits_of(model, images, rep.normalization)[0], clean_logits), name
