"""Quality: the winner of a <= 30-minute CPU search on PneumoniaMNIST, test AUC and accuracy with 95 % CIs,
beside MedMNIST v2's published results (Yang et al. 2023, Table 3). Target: beat every ResNet and AutoKeras row.

The winner is chosen on validation by tune.py; its test split is scored once (argmax rule, as the paper).

    python bench/quality.py --data-root <medmnist folder> [--space bench/quality_space.yaml --device cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402

from analysis import runs  # noqa: E402
from analysis.bootstrap import format_ci, metrics_with_ci  # noqa: E402
from analysis.replay import logits_of, replay  # noqa: E402
from bench.common import base_parser, machine_line, run_tune  # noqa: E402
from trainables.metrics import probabilities  # noqa: E402

PUBLISHED = {  # PneumoniaMNIST test (AUC, ACC), MedMNIST v2 Table 3
    "ResNet-18 (28)": (0.944, 0.854), "ResNet-50 (224)": (0.962, 0.884), "AutoKeras": (0.947, 0.878),
    "Google AutoML Vision": (0.991, 0.946),
}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path(__file__).with_name("quality_space.yaml"))
    args = parser.parse_args()
    print(machine_line())
    import yaml

    space = yaml.safe_load(args.space.read_text())
    space["fixed"]["device"] = args.device
    if args.device == "cuda":  # Ray hides GPUs from trials that do not ask for one
        space["resources"]["gpu"] = 0.5
    seconds, workdir = run_tune(space, "--data-root", args.data_root)
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    best = runs.winner(client, runs.get_search(client, "bench"))
    rep = replay(runs.checkpoint_state(best), args.data_root)
    logits, labels = logits_of(rep.model, rep.test)
    cis = metrics_with_ci(rep.dataset.task, labels, probabilities(rep.dataset.task, logits))
    print(f"search: {space['num_samples']} trials in {seconds / 60:.1f} min; winner {runs.trial_label(best)} "
          f"{ {k: best.data.params[k] for k in space['params']} }")
    print(f"medtune winner: test AUC {format_ci(cis['auc'])}, ACC {format_ci(cis['acc'])}")
    for name, (auc, acc) in PUBLISHED.items():
        print(f"  {name:22s} AUC {auc:.3f}  ACC {acc:.3f}")
    rivals = {k: v for k, v in PUBLISHED.items() if k.startswith("ResNet") or k == "AutoKeras"}
    best_auc, best_acc = max(v[0] for v in rivals.values()), max(v[1] for v in rivals.values())
    print(f"ours / best ResNet-or-AutoKeras row: AUC {cis['auc']['value'] / best_auc:.3f}, "
          f"ACC {cis['acc']['value'] / best_acc:.3f}")


if __name__ == "__main__":
    main()
