"""Subgroups and robustness: per-image attributes from the loaders, test metrics per group with CIs and the flag,
the corruptions the export scores the shipped model under, and both in the export's card and metrics.json."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import real_data, toy_dataset
from PIL import Image
from sklearn.metrics import accuracy_score, roc_auc_score
from test_analysis import TOY, log_search, run_main, toy_winner

from analysis import description, export, robustness
from analysis.bootstrap import metrics_with_ci
from analysis.calibration import calibrated
from analysis.predict import load_model
from analysis.replay import logits_of
from analysis.subgroups import age_band, score_groups, weakest_group
from trainables.config import resolve_config
from trainables.data.attributes import parse_age
from trainables.data.datasets import load_dataset
from trainables.data.folder_datasets import read_nih
from trainables.data.normalization import Normalization
from trainables.errors import UserError
from trainables.tracking.names import PREDICTIONS
from trainables.training.checkpoint_files import write_epoch_checkpoint
from trainables.training.epochs import iterate_epochs
from trainables.training.figures import read_test_predictions, write_test_predictions

load = load_dataset.__wrapped__  # no per-process memo: each test reads its own files


# --- attributes from the loaders ---------------------------------------------------------------------

def test_age_strings_parse_as_dicom_ages_and_bad_ones_are_one_line():
    """Cost: milliseconds."""
    ages = parse_age(pd.Series(["060Y", "018M", "026W", "010D", " 7 ", None, ""]), "t.csv")
    assert ages[:5] == pytest.approx([60.0, 1.5, 0.4983, 10 / 365.25, 7.0], abs=1e-4)
    assert np.isnan(ages[5:]).all()
    with pytest.raises(UserError, match=r"t.csv row 2: age 'sixty' is neither .* DICOM age string like 060Y"):
        parse_age(pd.Series(["060Y", "sixty"]), "t.csv")
    assert [age_band(a) for a in (0, 19.9, 20, 39, 40, 59.5, 60, 79, 80, 101, np.nan, 414, -1)] == \
        ["<20", "<20", "20-39", "20-39", "40-59", "40-59", "60-79", "60-79", "80+", "80+", "unknown", "unknown", "unknown"]


@pytest.mark.integration
def test_nih_sample_reads_sex_age_and_view_from_either_table(tmp_path):
    """The release's Data_Entry_2017 (integer ages) and the Kaggle sample's sample_labels.csv (`060Y` strings)
    give the same attributes. Cost: reads two 1,000-row CSVs, no image decoded; under 1 s."""
    source = real_data("nih_chestxray14_sample")
    release = pd.read_csv(source / "Data_Entry_2017_v2020.csv")
    sample = release.assign(**{"Patient Age": release["Patient Age"].map(lambda a: f"{a:03d}Y")})
    assert sample["Patient Age"].iloc[0] == "057Y"
    sample.to_csv(tmp_path / "sample_labels.csv", index=False)
    from_release, from_sample = read_nih(source), read_nih(tmp_path / "sample_labels.csv")
    assert set(from_release.attributes) == {"sex", "age", "view"}
    for name in ("sex", "age", "view"):
        assert np.array_equal(from_release.attributes[name], from_sample.attributes[name])
    assert from_sample.attributes["age"].tolist() == release["Patient Age"].astype(float).tolist()
    assert from_release.attributes["sex"].tolist() == release["Patient Gender"].tolist()
    assert sorted(set(from_release.attributes["view"])) == ["AP", "PA"]


def write_csv_set(folder, n: int = 40) -> pd.DataFrame:
    """n tiny grey PNGs and a table with a label, sex (some unknown), age (some empty) and site column."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), mode="L").save(folder / "img" / f"{i}.png")
        rows.append({"file": f"img/{i}.png", "dx": ["nv", "mel"][i % 2], "sex": ["female", "male", None][i % 3],
                     "age": None if i % 7 == 0 else float(15 + 2 * i), "site": f"s{i % 40}"})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "meta.csv", index=False)
    return table


def test_csv_subgroups_option_carries_the_named_columns_to_every_split(tmp_path):
    """Cost: decodes 40 12-px images; under 1 s."""
    table = write_csv_set(tmp_path).set_index("file")
    data = load(f"csv:{tmp_path / 'meta.csv'}?image=file&label=dx&subgroups=sex,age&test_fraction=0.25", image_size=12)
    for part, files in ((data.dev, data.dev_files), (data.test, data.test_files)):
        rows = table.loc[[f.split(str(tmp_path) + "/")[1] for f in files]]
        assert set(part.attributes) == {"sex", "age"}
        assert part.attributes["sex"].tolist() == rows["sex"].fillna("unknown").tolist()
        assert np.array_equal(part.attributes["age"], rows["age"].to_numpy(float), equal_nan=True)
    assert data.dev.subset(np.arange(3)).attributes["sex"].tolist() == data.dev.attributes["sex"][:3].tolist()
    with pytest.raises(UserError, match="has no column 'gender' for subgroups="):
        load(f"csv:{tmp_path / 'meta.csv'}?image=file&label=dx&subgroups=gender", image_size=12)
    with pytest.raises(UserError, match="subgroup column 'site' has 40 distinct values"):
        load(f"csv:{tmp_path / 'meta.csv'}?image=file&label=dx&subgroups=site", image_size=12)


# --- metrics per group -------------------------------------------------------------------------------

def binary_case(seed: int = 0):
    """300 test cases: group A (150) well ranked, group B (120) ranked by chance, group C (30, 3 positives)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    group = np.array(["A"] * 150 + ["B"] * 120 + ["C"] * 30)
    labels[270:] = 0
    labels[[270, 280, 290]] = 1
    score = np.where(group == "B", rng.random(300), np.clip(labels * 0.5 + rng.random(300) * 0.6, 0, 1))
    return labels, np.c_[1 - score, score], {"site": group, "age": np.r_[np.full(290, 45.0), np.full(10, 85.0)]}


def test_each_groups_metrics_are_the_metrics_of_its_own_rows_and_small_groups_are_listed_unscored():
    """Cost: six bootstraps of 100 resamples over 120-290 cases; about 4 s of CPU time."""
    labels, probs, attributes = binary_case()
    rows = score_groups("binary", ["neg", "pos"], labels, probs, 0.4, attributes, n_resamples=100, seed=3)
    by = {(r["attribute"], r["group"]): r for r in rows}
    assert list(by) == [("site", "A"), ("site", "B"), ("site", "C"), ("age", "40-59"), ("age", "80+")]
    for group in ("A", "B"):
        row, mine = by[("site", group)], attributes["site"] == group
        assert row["n"] == mine.sum() and row["scored"]
        assert row["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(labels[mine], probs[mine, 1]), abs=1e-12)
        assert row["metrics"]["acc"]["value"] == accuracy_score(labels[mine], probs[mine, 1] >= 0.4)
        assert row["metrics"] == {k: v for k, v in metrics_with_ci("binary", labels[mine], probs[mine], 0.4, 100, seed=3)
                                  .items() if k in row["metrics"]}  # the same bootstrap as the whole test split
        assert row["overall"]["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-12)
    assert not by[("site", "C")]["scored"] and "class pos has 3 image(s)" in by[("site", "C")]["not_scored_because"]
    assert by[("age", "80+")] == {"attribute": "age", "group": "80+", "n": 10, "per_class": {"neg": 10 - 1, "pos": 1},
                                  "scored": False, "not_scored_because": "fewer than 30 images"}
    # the flag: B (ranked by chance) lies wholly below the overall AUC, A does not
    assert "auc" in by[("site", "B")]["below_overall"] and by[("site", "B")]["metrics"]["auc"]["high"] < \
        by[("site", "B")]["overall"]["auc"]
    assert by[("site", "A")]["below_overall"] == []
    low = weakest_group("binary", ["neg", "pos"], labels, probs, attributes, n_resamples=100, seed=3)  # argmax rule
    assert (low["attribute"], low["group"]) == ("site", "B") and low["metrics"]["auc"] == by[("site", "B")]["metrics"]["auc"]


def test_multilabel_groups_score_macro_auc_over_labels_with_five_positives():
    """Cost: one bootstrap of 300 resamples over 3 labels; well under 1 s."""
    rng = np.random.default_rng(1)
    labels = (rng.random((80, 3)) < [0.3, 0.3, 0.02]).astype(np.uint8)
    labels[:, 2] = 0
    labels[[0, 1, 2, 3], 2] = 1  # 4 positives of the third label, all in group a
    probs = np.clip(labels * 0.3 + rng.random((80, 3)) * 0.8, 0, 1)
    attributes = {"sex": np.array(["a"] * 40 + ["b"] * 40)}
    rows = score_groups("multilabel", ["x", "y", "z"], labels, probs, None, attributes, n_resamples=300)
    for row, mine in zip(rows, (slice(0, 40), slice(40, 80))):
        kept = [j for j in range(3) if labels[mine, j].sum() >= 5]
        assert row["labels_scored"] == [["x", "y", "z"][j] for j in kept] and 2 not in kept
        expected = np.mean([roc_auc_score(labels[mine, j], probs[mine, j]) for j in kept])
        assert row["metrics"]["auc"]["value"] == pytest.approx(expected, abs=1e-12)
        assert row["overall"]["auc"] == pytest.approx(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in kept]))
        assert row["metrics"]["auc"]["low"] < row["metrics"]["auc"]["value"] < row["metrics"]["auc"]["high"]


# --- corruptions -------------------------------------------------------------------------------------

def test_corruptions_are_seeded_and_severity_zero_is_the_image_itself():
    """Cost: 6 corruptions of 20 16-px images, a few times; under 1 s."""
    images = toy_dataset("binary", n_test=20).test.images
    for name in robustness.CORRUPTIONS:
        assert np.array_equal(robustness.corrupt(images, name, 0, seed=5), images), name
        once, again = robustness.corrupt(images, name, 3, seed=5), robustness.corrupt(images, name, 3, seed=5)
        assert np.array_equal(once, again) and once.dtype == np.uint8 and once.shape == images.shape, name
        assert not np.array_equal(once, images), name
    noisy = [robustness.corrupt(images, "gaussian_noise", 3, seed=s) for s in (5, 6)]
    assert not np.array_equal(*noisy)  # the seed draws the noise


# --- the export and the description ------------------------------------------------------------------

def with_attributes(data, seed: int = 0):
    """`data` with sex (40/40 on test: both scored) and age (one band under 30 images) on every image."""
    rng = np.random.default_rng(seed)

    def attach(part):
        n = len(part)
        return dataclasses.replace(part, attributes={"sex": np.array(["F", "M"] * (n // 2) + ["F"] * (n % 2)),
                                                     "age": rng.choice([25.0, 65.0, 85.0], n, p=[0.45, 0.45, 0.1])})
    return dataclasses.replace(data, dev=attach(data.dev), test=attach(data.test))


def test_export_card_and_metrics_report_each_subgroup_with_its_own_rows(tmp_path, monkeypatch, mlflow_store):
    """A toy binary winner whose test images carry sex and age: metrics.json and the card list every group with its
    count, scored on its own rows by the shipped decision rule; a band under 30 images is listed, not scored.
    Cost: a 3-epoch toy trial and its export (with the robustness passes over 80 16-px images); about 10 s."""
    data = with_attributes(toy_dataset("binary", n_dev=200, n_test=80))
    toy = toy_winner(tmp_path, monkeypatch, "binary", mlflow_store(tmp_path), data=data)
    out = tmp_path / "export"
    code, stdout, stderr = run_main(export, "--search", toy.name, "--tracking-uri", toy.uri, "--out", out,
                                    "--n-resamples", 100, "--ensemble", 1)
    assert code == 0, stdout + stderr
    metrics = json.loads((out / "metrics.json").read_text())
    decision = json.loads((out / "decision.json").read_text())
    logits, labels = logits_of(load_model(out), data.test, Normalization.from_meta(toy.state["dataset"]))
    probs = calibrated(logits, "binary", decision["temperature"])
    rows = {(r["attribute"], r["group"]): r for r in metrics["subgroups"]["groups"]}
    for sex in ("F", "M"):
        mine = data.test.attributes["sex"] == sex
        row = rows[("sex", sex)]
        assert row["n"] == mine.sum() == 40 and row["scored"]
        assert row["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(labels[mine], probs[mine, 1]), abs=1e-9)
        assert row["metrics"]["acc"]["value"] == accuracy_score(labels[mine], probs[mine, 1] >= decision["threshold"])
    eighty = rows[("age", "80+")]
    assert eighty["n"] == (data.test.attributes["age"] == 85).sum() < 30 and not eighty["scored"]
    card = (out / "model_card.md").read_text()
    assert "## Subgroups" in card and "| sex | F | 40 | " in card
    assert f"| age | 80+ | {eighty['n']} | not scored | not scored | not scored | not scored | fewer than 30 images |" in card
    assert "## Robustness to image corruptions" in card


def test_description_names_the_winners_weakest_subgroup_from_its_kept_predictions(tmp_path, mlflow_store):
    """The search's page names the weakest scored group of the winner's kept test predictions, computed once and
    kept on the run. Cost: one hand-logged run and one bootstrap; about 2 s."""
    labels, probs, attributes = binary_case()
    uri = mlflow_store(tmp_path)
    parent = log_search(uri, "subgroups", [{"trial_id": "t0000001", "metrics": {"best_val_auc": 0.9, "epoch": 2.0},
                                            "checkpoint": None}], {"metric": "val_auc", "mode": "max"})
    client = mlflow.MlflowClient(uri)
    winner = client.get_run(client.get_run(parent).data.tags["medtune.best_run_id"])
    client.log_artifact(winner.info.run_id, str(write_test_predictions(tmp_path, "binary", ["neg", "pos"], labels,
                                                                       probs, attributes)))
    assert (tmp_path / PREDICTIONS).exists()
    board = description.read_leaderboard(client, client.get_run(parent), n_resamples=200)
    page = description.markdown(board)
    assert "Weakest test subgroup (reported, never used to choose" in page and "site B (n = 120): AUC" in page
    assert "its CI wholly below it" in page
    kept = json.loads(client.get_run(winner.info.run_id).data.tags[description.TAG_WEAKEST])
    assert kept["row"]["group"] == "B" and kept["n_resamples"] == 200


def test_a_finished_trial_keeps_its_test_images_attributes_beside_its_test_predictions(tmp_path):
    """What the search's page reads without the data: the final checkpoint's test predictions carry each test
    image's attributes, row for row. Cost: a 1-epoch toy trial and its report figures; about 6 s."""
    data = with_attributes(toy_dataset("binary", n_dev=200, n_test=80))
    *_, last = iterate_epochs(resolve_config(TOY | {"epochs": 1}), data)
    write_epoch_checkpoint(tmp_path, last, data, {})
    kept = read_test_predictions(tmp_path / PREDICTIONS)
    assert np.array_equal(kept["labels"], data.test.labels) and set(kept["attributes"]) == {"sex", "age"}
    assert np.array_equal(kept["attributes"]["sex"], data.test.attributes["sex"])
    assert np.array_equal(kept["attributes"]["age"], data.test.attributes["age"])


def test_robustness_corrupts_at_most_its_cap_a_stratified_seeded_sample_and_says_so():
    # An NIH-sized test split would cost hours of CPU over 31 passes; the card names the sample instead.
    from analysis import robustness
    from trainables.data.registry import ImageSet

    labels = np.repeat([0, 1], [300, 100])
    test = ImageSet(np.random.default_rng(0).integers(0, 256, (400, 8, 8, 1), dtype=np.uint8), labels)
    part = robustness.sample(test, "binary", 100, seed=0)
    assert len(part.labels) == 100 and part.labels.sum() == 25  # the class shares kept
    assert np.array_equal(robustness.sample(test, "binary", 100, seed=0).images, part.images)
    assert robustness.sample(test, "binary", 0, seed=0) is test and robustness.sample(test, "binary", 400, 0) is test
    seen = []
    report = robustness.robustness_report(lambda images: seen.append(len(images.labels)) or
                                          np.c_[np.zeros(len(images.labels)), images.images.mean(axis=(1, 2, 3))],
                                          test, "binary", {"temperature": 1.0, "threshold": None}, max_images=100)
    assert set(seen) == {100} and report["n"] == 100 and report["n_test"] == 400
    assert "a seeded sample stratified by class, 100 of its 400 images" in robustness.card_section(report)
