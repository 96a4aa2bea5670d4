"""Names every layer shares: how a search is laid out in MLflow (tags) and the files a trial leaves.

One experiment ("medtune"), one parent run per search, one nested run per trial. The tags are the contract
between the search (which writes them) and `analysis/` (which reads them); the file names are what a trial's
final checkpoint folder holds besides its weights. No MLflow or Ray import here: a trial imports this module.
"""

EXPERIMENT = "medtune"
TAG_SEARCH = "medtune.search"  # search name, on the parent and every trial run
TAG_ROLE = "medtune.role"  # "search" (parent) or "trial"
TAG_TRIAL = "medtune.trial_id"  # Ray's trial id: a resumed trial finds its run again
TAG_OUTCOME = "medtune.outcome"  # completed | stopped_early | cut_by_budget | interrupted | failed
TAG_CHECKPOINT = "medtune.checkpoint"  # URI of the trial's latest checkpoint (it holds the best weights)
TAG_BEST_RUN = "medtune.best_run_id"  # on the parent
TAG_IS_BEST = "medtune.best_trial"  # "true" on the winning trial run
TAG_HANDOVER = "medtune.handover"  # on the parent: the model handed over (variant, why, members and weights), JSON
TAG_ERROR = "medtune.error"  # a failed trial's last error line
TAG_SPACE, TAG_DATASET, TAG_SEED, TAG_VERSION = "medtune.space", "medtune.dataset", "medtune.seed", "medtune.version"
TAG_TRIAL_RUN = "medtune.trial_run_id"  # on a registered model version: the trial it came from
PARENT = "mlflow.parentRunId"
# a result key: an epoch a restarted data-parallel trial reports again from its checkpoint (trainables/distributed.py),
# because Ray Train had saved it when the search stopped but Tune may never have received it; logged once
REPLAYED = "replayed_from_checkpoint"

REPORT_ARTIFACTS = ("confusion_matrix.png", "roc_curve.png", "learning_curves.png", "classification_report.json")
STUDY_ARTIFACTS = ("misclassified_test.png", "augmented_train.png", "class_distribution.png", "class_distribution.json")
PREDICTIONS = "test_predictions.npz"  # test labels and probabilities: a few kB for a MedMNIST test split
GAN_ARTIFACTS = ("gan_samples.png", "gan_losses.png", "gan_training.json")  # only with synthetic_pct > 0
# every file a finished trial's checkpoint folder holds besides the weights (the MLflow callback logs them all)
ARTIFACTS = REPORT_ARTIFACTS + STUDY_ARTIFACTS + (PREDICTIONS,) + GAN_ARTIFACTS
OOF_PREDICTIONS = "oof_predictions.npz"  # and a cross-validated trial's out-of-fold development-pool predictions
# a single-split trial's validation labels and logits from its best weights so far (row indices into the development
# pool, the trial's config): in EVERY checkpoint, so an ASHA-stopped trial keeps them too (a few kB each); what
# ensemble selection (analysis.selection) reads instead of replaying dozens of trials
VAL_PREDICTIONS = "val_predictions.npz"
