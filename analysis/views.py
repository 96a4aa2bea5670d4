"""The study report's views of a search: what a user looks at to trust (or not) the trial it picked.

Static images with matplotlib (optimisation history, score against cost), interactive ones with plotly
(learning curves with ASHA's decisions, parallel coordinates) and Optuna's own importance plot. Every
function takes the trials table `analysis.report_data.trials_frame` builds (one row per trial) and draws one view.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from trainables.tracking.ranking import COMPLETED, FAILED, STOPPED_EARLY  # noqa: E402
from trainables.tracking.text import fmt  # noqa: E402

COSTS = {"params_total": "parameters", "flops_per_image": "FLOPs per image"}  # logged by every trial
COLOURS = {COMPLETED: "#1f77b4", STOPPED_EARLY: "#8c8c8c", FAILED: "#d62728"}
MIN_IMPORTANCE_TRIALS = 10  # fANOVA's forest on fewer completed trials mostly fits noise: shown, with a warning


# --- readable axes -----------------------------------------------------------------------------------

def compact(value: float, _position=None) -> str:
    """A tick label short enough not to collide: 0.003, 0.25, 12, 3.4k, 1.2M, 5G."""
    if value == 0:
        return "0"
    if abs(value) >= 1e15 or abs(value) < 1e-4:
        return f"{value:.2g}"
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def log_axis(ax, which: str = "x") -> None:
    """A log axis labelled at 1-2-5 steps in plain numbers, minor ticks unlabelled (matplotlib's default labels
    minor ticks on short ranges: the overlapping 2x10^-2 3x10^-2 ... of the old report)."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(axis.get_view_interval())
    decades = math.log10(high / low) if low > 0 else math.inf
    # 1-2-5 within two decades; beyond, decades only (matplotlib gives no major ticks for 1-2-5 once it skips decades)
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(compact))
    axis.set_minor_formatter(NullFormatter())


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of visible tick labels on one axis whose boxes overlap once drawn (none in a readable figure)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = _visible_labels(axis, renderer)
            pairs += [(a.get_text(), b.get_text()) for (a, box_a), (b, box_b) in zip(labels, labels[1:])
                      if box_a.overlaps(box_b)]
    return pairs


def declutter(fig) -> None:
    """Hide every tick label that would overlap the one before it, on every axis of `fig`."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            kept = None
            for label, box in _visible_labels(axis, renderer):
                if kept is not None and box.overlaps(kept):
                    label.set_visible(False)
                else:
                    kept = box


def _visible_labels(axis, renderer) -> list:
    """(label, padded box) of an axis's drawn, non-empty tick labels, in axis order."""
    view = axis.get_view_interval()
    low, high = min(view), max(view)
    found = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        label = tick.label1
        if label.get_visible() and label.get_text() and low <= tick.get_loc() <= high:
            found.append((tick.get_loc(), label, label.get_window_extent(renderer).padded(2)))
    return [(label, box) for _, label, box in sorted(found, key=lambda item: item[0])]


def save(fig, path) -> None:
    declutter(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- optimisation history ----------------------------------------------------------------------------

def best_so_far(scores: list[float], mode: str) -> list[float]:
    """The running best of `scores` in `mode` (NaN never improves it)."""
    best, out = math.nan, []
    for score in scores:
        if not math.isnan(score) and (math.isnan(best) or (score > best if mode == "max" else score < best)):
            best = score
        out.append(best)
    return out


def plot_history(frame: pd.DataFrame, objective: str, mode: str, winner: str | None, path) -> None:
    """Best-so-far validation score against trials (in the order they started) and against wall time."""
    trials = frame.sort_values("start").reset_index(drop=True)
    trials["number"] = np.arange(1, len(trials) + 1)
    trials["minutes"] = (trials["end"].fillna(trials["start"]) - trials["start"].min()) / 60_000
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, x, label in ((axes[0], "number", "trial (in the order trials started)"),
                         (axes[1], "minutes", "minutes since the search started (at each trial's end)")):
        for outcome, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
            part = trials[trials["outcome"] == outcome]
            ax.scatter(part[x], part[objective], marker=marker, color=COLOURS[outcome], zorder=3,
                       label=f"{outcome.replace('_', ' ')} ({len(part)})")
        done = trials[trials["outcome"] == COMPLETED].sort_values(x)
        if not done.empty:  # drawn on to the last trial: the best stayed the best until the search ended
            xs = [*done[x], trials[x].max()]
            ys = best_so_far(done[objective].tolist(), mode)
            ax.step(xs, [*ys, ys[-1]], where="post", color="black", label="best so far (completed: eligible to win)")
        chosen = trials[trials["trial"] == winner]
        ax.scatter(chosen[x], chosen[objective], marker="*", s=240, color="gold", edgecolor="black", zorder=4,
                   label="winner")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.margins(0.06, 0.1)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"{objective}\n(validation, {'higher' if mode == 'max' else 'lower'} is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    failed = int((frame["outcome"] == FAILED).sum())
    fig.suptitle("Optimisation history" + (f" ({failed} failed trial{'s' if failed > 1 else ''}: no score)" if failed else ""))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save(fig, path)


# --- learning curves and ASHA's decisions ------------------------------------------------------------

def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs at which ASHA compares a trial with the others and may stop it: Ray's one-bracket rule
    (ray.tune.schedulers.async_hyperband._Bracket, s=0), ascending, below max_t (a trial at max_t is done)."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return sorted(m for m in (grace_period * reduction_factor ** k for k in range(count)) if m < max_t)


def rung_decisions(history: list[tuple[int, float]], outcome: str, rungs: list[int]) -> list[tuple[int, str]]:
    """[(epoch, "kept" | "stopped")] at each rung the trial reached: stopped at its last epoch when ASHA stopped
    it (the outcome tag), kept where it trained on past the rung."""
    last = max((epoch for epoch, _ in history), default=0)
    decisions = [(rung, "kept") for rung in rungs if rung < last]
    if outcome == STOPPED_EARLY and last:
        decisions.append((last, "stopped"))
    return decisions


def decision_text(decisions: list[tuple[int, str]]) -> str:
    """`kept at epoch 1, stopped by ASHA at epoch 2` (or `-` when ASHA never looked at the trial)."""
    return ", ".join(f"{'stopped by ASHA' if what == 'stopped' else 'kept'} at epoch {epoch}"
                     for epoch, what in decisions) or "-"


def learning_curves_figure(frame: pd.DataFrame, histories: dict, rungs: list[int], metric: str, searched: list[str],
                           winner: str | None = None):
    """Every trial's validation curve (plotly, hover names the trial and its values), ASHA's rungs as dotted lines,
    its decisions as markers: a circle where a trial was kept, a cross where it was stopped."""
    import plotly.graph_objects as go

    fig, shown = go.Figure(), set()
    marks = {"kept": ([], [], []), "stopped": ([], [], [])}
    for row in sorted(frame.to_dict("records"), key=lambda r: r["trial"] == winner):  # the winner drawn last, on top
        history = histories.get(row["run_id"], [])
        if not history:
            continue
        epochs, values = zip(*history)
        hover = f"{row['trial']} ({row['outcome'].replace('_', ' ')})<br>" + "<br>".join(
            f"{k} = {fmt(row.get(k))}" for k in searched)
        group = "winner" if row["trial"] == winner else row["outcome"]
        fig.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers", name=group.replace("_", " "),
                                 legendgroup=group, showlegend=group not in shown,
                                 line={"color": "#e6a700" if group == "winner" else COLOURS.get(group, "#9467bd"),
                                       "width": 4 if group == "winner" else 1.5},
                                 marker={"size": 4}, hovertemplate=hover + "<br>epoch %{x}: %{y:.4g}<extra></extra>"))
        shown.add(group)
        by_epoch = dict(history)
        for epoch, what in rung_decisions(history, row["outcome"], rungs):
            xs, ys, texts = marks[what]
            xs.append(epoch)
            ys.append(by_epoch.get(epoch))
            texts.append(f"{row['trial']}: {decision_text([(epoch, what)])}")
    for what, symbol, colour in (("kept", "circle-open", "#2ca02c"), ("stopped", "x", "#d62728")):
        xs, ys, texts = marks[what]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", text=texts, hovertemplate="%{text}<extra></extra>",
                                 name=f"{what} by ASHA at a rung" if what == "stopped" else "kept at a rung",
                                 marker={"symbol": symbol, "size": 12, "color": colour, "line": {"width": 2}}))
    for rung in rungs:
        fig.add_vline(x=rung, line={"dash": "dot", "color": "#999"}, annotation_text=f"rung {rung}",
                      annotation_position="top")
    fig.update_layout(title=f"Learning curves: {metric} per epoch, with ASHA's decisions", xaxis_title="epoch",
                      yaxis_title=metric, height=480, template="plotly_white", hovermode="closest")
    fig.update_xaxes(tickformat="d", dtick=1 if max((len(h) for h in histories.values()), default=0) <= 20 else None)
    return fig


# --- parallel coordinates ----------------------------------------------------------------------------

def parallel_coordinates_figure(frame: pd.DataFrame, keys: list[str], log_keys: set[str], objective: str, mode: str):
    """One line per scored trial across the searched values, coloured by the validation score (brighter is better),
    plus an `outcome` axis: drag on any axis to keep a range (brushing, as in W&B)."""
    import plotly.graph_objects as go

    scored = frame[frame[objective].notna() & frame["outcome"].isin([COMPLETED, STOPPED_EARLY])]
    if scored.empty:
        return None
    dimensions = [_dimension(scored[k], k, k in log_keys or _spans_decades(scored[k])) for k in keys]
    finished = (scored["outcome"] == COMPLETED).astype(int)
    dimensions.append({"label": "outcome", "values": finished, "tickvals": [0, 1], "ticktext": ["stopped", "completed"],
                       "range": [-0.2, 1.2]})
    dimensions.append({"label": objective, "values": scored[objective]})
    line = {"color": scored[objective], "colorscale": "Viridis", "reversescale": mode == "min", "showscale": True,
            "colorbar": {"title": {"text": f"{objective}<br>({'higher' if mode == 'max' else 'lower'} is better)"}}}
    fig = go.Figure(go.Parcoords(line=line, dimensions=dimensions, labelangle=-20))
    fig.update_layout(title=f"Searched values of {len(scored)} scored trials, coloured by {objective}", height=460,
                      margin={"l": 90, "r": 60, "t": 110, "b": 40})
    return fig


def _spans_decades(values: pd.Series) -> bool:
    """Positive numbers over a decade or more (lr choices such as 0.01 ... 0.3): read on a log scale."""
    numeric = pd.to_numeric(values, errors="coerce")
    return bool(numeric.notna().all() and (numeric > 0).all() and numeric.max() / numeric.min() >= 10)


def _dimension(values: pd.Series, key: str, log: bool) -> dict:
    """A parcoords axis: categories as labelled positions, log-searched numbers on a log10 scale with plain labels."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any() or values.map(lambda v: isinstance(v, bool)).any():
        categories = sorted({str(v) for v in values})
        return {"label": key, "values": values.map(lambda v: categories.index(str(v))),
                "tickvals": list(range(len(categories))), "ticktext": categories, "range": [-0.3, len(categories) - 0.7]}
    if log and (numeric > 0).all():
        low, high = math.floor(np.log10(numeric.min())), math.ceil(np.log10(numeric.max()))
        ticks = [m * 10.0 ** e for e in range(low, high + 1) for m in (1, 2, 5)]
        ticks = [t for t in ticks if numeric.min() / 1.01 <= t <= numeric.max() * 1.01] or sorted(set(numeric))
        return {"label": f"{key} (log)", "values": np.log10(numeric), "tickvals": np.log10(ticks).tolist(),
                "ticktext": [compact(t) for t in ticks]}
    return {"label": key, "values": numeric}


# --- importance --------------------------------------------------------------------------------------

def importance_warning(completed: int) -> str | None:
    if completed >= MIN_IMPORTANCE_TRIALS:
        return None
    return (f"Only {completed} completed trials (fewer than {MIN_IMPORTANCE_TRIALS}): fANOVA's random forest on so few "
            "points mostly fits noise. Read it as a hint, not a finding.")


def importance_figure(study, objective: str):
    """Optuna's own fANOVA importance plot (plotly), on the study rebuilt from MLflow, seeded."""
    import optuna

    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    fig = optuna.visualization.plot_param_importances(study, evaluator=evaluator, target_name=objective)
    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    fig.update_layout(title=f"fANOVA importance for {objective}, from {completed} completed trials", height=320)
    return fig


# --- validation score against cost ------------------------------------------------------------------

def pareto_front(costs: list[float], scores: list[float], mode: str) -> list[int]:
    """Indices of the trials no other beats on both cost (lower) and score (in `mode`), cheapest first."""
    sign = 1.0 if mode == "max" else -1.0
    order = sorted((i for i in range(len(costs)) if not (math.isnan(costs[i]) or math.isnan(scores[i]))),
                   key=lambda i: (costs[i], -sign * scores[i]))
    front, best = [], -math.inf
    for i in order:
        if sign * scores[i] > best:
            front.append(i)
            best = sign * scores[i]
    return front


def cost_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in COSTS if c in frame and frame[c].notna().any()]


def plot_cost(frame: pd.DataFrame, objective: str, mode: str, winner: str | None, path) -> bool:
    """Validation score against each logged cost, with the Pareto front of the completed trials; False when no
    trial logged a cost (searches from before trials counted them)."""
    costs = cost_columns(frame)
    if not costs:
        return False
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4), squeeze=False, sharey=True)
    for ax, cost in zip(axes[0], costs):
        for outcome, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
            part = frame[(frame["outcome"] == outcome) & frame[cost].notna()]
            ax.scatter(part[cost], part[objective], marker=marker, color=COLOURS[outcome], zorder=3,
                       label=outcome.replace("_", " "))
        ax.margins(0.08, 0.1)
        done = frame[(frame["outcome"] == COMPLETED) & frame[cost].notna() & frame[objective].notna()].reset_index()
        front = done.loc[pareto_front(done[cost].tolist(), done[objective].tolist(), mode)]
        if not front.empty:
            ax.step(front[cost], front[objective], where="post", color="black", lw=1, label="Pareto front (completed)")
        chosen = done[done["trial"] == winner]
        if not chosen.empty:
            ax.scatter(chosen[cost], chosen[objective], marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                       label="winner")
        values = frame[cost].dropna()
        if values.min() > 0 and values.max() / values.min() > 3:
            log_axis(ax, "x")
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(compact))
            ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel(COSTS[cost] + ("" if values.nunique() > 1 else " (the same for every trial)"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{objective} (validation)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Validation score against cost")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save(fig, path)
    return True


# --- the report's static plots of every searched value ----------------------------------------------------

def plot_metric_vs_params(frame: pd.DataFrame, keys: list[str], choice_keys: set[str], log_keys: set[str], objective: str,
                          metric: str, path) -> None:
    """One column per searched param: validation score (top) and test metric (bottom) of every trial; `choice_keys`
    are drawn as categories, `log_keys` on a log axis."""
    keys = keys or ["trial"]
    fig, axes = plt.subplots(2, len(keys), figsize=(3.6 * len(keys), 6.4), squeeze=False)
    ok = frame[frame["outcome"].isin([COMPLETED, STOPPED_EARLY])]
    for col, key in enumerate(keys):
        categories = sorted(ok[key].dropna().unique(), key=_sort_key) if key in ok else []
        categorical = key in choice_keys or key == "trial"
        for row, value in enumerate((objective, metric)):
            ax = axes[row][col]
            for outcome, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
                part = ok[(ok["outcome"] == outcome) & ok[value].notna()]
                if part.empty:
                    continue
                x = part[key].map({c: i for i, c in enumerate(categories)}) if categorical else part[key]
                ax.scatter(x, part[value], marker=marker, label=outcome.replace("_", " "), alpha=0.8)
            if categorical:
                ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=30, ha="right")
            elif key in log_keys:
                log_axis(ax, "x")
            ax.set_xlabel(key)
            ax.set_ylabel(value)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Trials: validation score (selection) and test metric (reporting)")
    fig.tight_layout()
    save(fig, path)


def plot_importance(importance: pd.Series, objective: str, path) -> None:
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * max(len(importance), 1)))
    importance.sort_values().plot.barh(ax=ax)
    ax.set_xlabel(f"fANOVA importance for {objective}")
    fig.tight_layout()
    save(fig, path)


def _sort_key(value):
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0.0, str(value))
