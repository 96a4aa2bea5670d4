"""The search's sampler: Optuna's TPE with the settings the search relies on, and no configuration run twice.

How a repeat happens: Optuna's TPE does not avoid configurations already tried. Over categorical and quantised keys
(a `choice`, `int` or `quniform` domain) the same combination is easily drawn twice: in the random start-up trials
by chance (the birthday problem), and once TPE models the results because the ratio l(x)/g(x) it maximises has
the same argmax over a few discrete combinations until the results move it; a space with fewer combinations than
trials must repeat. The constant liar (running trials count as bad results) makes a running trial's neighbourhood
less likely, not impossible, and is not used in the random start-up. On a small discrete space (2 x 2 x 2, 8
trials, 2 at a time) Optuna 5.1's defaults repeated 2-3 configurations per seed, with both settings off 2-5.
With the trial seed fixed a repeat would train the same model again: budget spent for nothing.

A proposal equal to a trial already in the study is therefore told to Optuna as a duplicate and asked again (Optuna's
own advice for duplicates: report the earlier trial's value, so TPE sees that point scored as it was): a repeat of
a finished trial gets its value (or pruned, as it was), a repeat of a running trial is told failed (it has no value
yet; TPE ignores failed trials). Only a proposal no trial has had is run. When the sampler proposes nothing new
`MAX_ASKS` times in a row (a discrete space exhausted, or TPE settled on tried points) the search starts no more
trials: it says so in one line. Points given in `points_to_evaluate` go through the same check.
"""

from __future__ import annotations

from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

MAX_ASKS = 20  # proposals per trial before the search stops proposing (each repeat is told to TPE, which moves it)
REPEAT_OF = "repeat_of"  # user attribute of a duplicate Optuna trial: the number of the trial it repeated


class DistinctOptunaSearch(OptunaSearch):
    """OptunaSearch that never returns a configuration a trial of the study already has (see the module)."""

    def suggest(self, trial_id: str):
        for _ in range(MAX_ASKS):
            config = super().suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                return config
            proposal = self._ot_trials[trial_id]
            earlier = next((t for t in self._ot_study.get_trials(deepcopy=False)
                            if t.number != proposal.number and t.state != TrialState.FAIL
                            and t.params == proposal.params), None)
            if earlier is None:
                return config
            self._tell_repeat(self._ot_trials.pop(trial_id), earlier)
        print(f"search: the sampler proposed only configurations already tried ({MAX_ASKS} in a row); "
              "no further trial starts", flush=True)
        return Searcher.FINISHED

    def _tell_repeat(self, proposal, earlier) -> None:
        proposal.set_user_attr(REPEAT_OF, earlier.number)
        if earlier.state == TrialState.COMPLETE:
            self._ot_study.tell(proposal, earlier.value)
        else:  # pruned: as it was; running or waiting: no value yet
            self._ot_study.tell(proposal, state=TrialState.PRUNED if earlier.state == TrialState.PRUNED
                                else TrialState.FAIL)
