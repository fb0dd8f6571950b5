"""monitor's verdict on synthetic runs of known size and shift: a change must be both
significant (on a fixed-size sample) and large (effect size at its threshold)."""

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from imgcls.config import DriftThresholds
from imgcls.evaluation.monitor import RunSample, compare, decide, subsample_counts

CLASSES = [f"c{i}" for i in range(10)]


def shifted(tv: float) -> np.ndarray:
    """Ten class shares at total variation ``tv`` from uniform: five up, five down."""
    return np.repeat([0.1 + tv / 5, 0.1 - tv / 5], 5)


def run(rows: int, shares: np.ndarray, rng, errors: int = 0, scores=None) -> RunSample:
    counts = rng.multinomial(rows - errors, shares)
    scores = rng.beta(5, 2, 10_000) if scores is None else scores
    return RunSample(uri="synthetic", rows=rows, errors=errors, class_counts=dict(zip(CLASSES, counts.tolist())),
                     scores=scores)


def test_a_one_percent_prior_shift_over_a_million_rows_is_significant_but_small():
    """The chi-square test of the full counts calls it significant (p far below 0.01);
    monitor tests 10,000 rows a side and weighs the Jensen-Shannon distance (0.007)
    against its threshold, and reports no drift."""
    rng = np.random.default_rng(0)
    ref, cur = run(1_000_000, shifted(0), rng), run(1_000_000, shifted(0.01), rng)
    full = np.array([list(ref.class_counts.values()), list(cur.class_counts.values())])
    assert chi2_contingency(full).pvalue < 1e-6
    result = compare(ref, cur)
    classes = result["tests"]["classes"]
    assert not result["drift"] and classes["n"] == [10_000, 10_000], classes
    assert 0.004 < classes["effect"] < DriftThresholds().class_threshold and not classes["large"]
    assert "effect" in classes["decided_by"] and classes["threshold"] == 0.03


@pytest.mark.parametrize("tv", [0.10, 0.30])
def test_ten_and_thirty_percent_prior_shifts_over_a_million_rows_drift(tv):
    rng = np.random.default_rng(1)
    result = compare(run(1_000_000, shifted(0), rng), run(1_000_000, shifted(tv), rng))
    classes = result["tests"]["classes"]
    assert result["drifted"] == ["classes"], result["tests"]
    assert classes["significant"] and classes["large"] and classes["decided_by"] == "p-value and effect"
    assert classes["effect"] > (0.05 if tv == 0.10 else 0.2)


def test_on_small_runs_the_test_holds_back_the_distance_of_chance():
    """Two runs of 1,000 rows of one class mix are about 0.05 apart in Jensen-Shannon
    distance, over the 0.03 threshold: the p-value decides, and it finds nothing; a
    class gone from 1,000 rows is both significant and large."""
    rng = np.random.default_rng(2)
    verdicts = [compare(run(1000, shifted(0), rng), run(1000, shifted(0), rng))["tests"]["classes"]
                for _ in range(20)]
    assert np.mean([v["effect"] for v in verdicts]) > 0.03
    assert sum(v["drift"] for v in verdicts) <= 1 and all(v["decided_by"] != "effect" for v in verdicts)
    gone = np.r_[np.full(9, 1 / 9), 0]
    removed = compare(run(1000, shifted(0), rng), run(1000, gone, rng))
    assert removed["drifted"] == ["classes"] and removed["tests"]["classes"]["effect"] > 0.2


def test_confidence_drifts_by_the_wasserstein_distance_over_the_reference_std():
    rng = np.random.default_rng(3)
    ref = run(1_000_000, shifted(0), rng, scores=rng.beta(5, 2, 10_000))
    nudged = run(1_000_000, shifted(0), rng, scores=np.clip(rng.beta(5, 2, 10_000) + 0.01, 0, 1))
    lower = run(1_000_000, shifted(0), rng, scores=rng.beta(3, 2, 10_000))
    small, large = compare(ref, nudged)["tests"]["confidence"], compare(ref, lower)["tests"]["confidence"]
    assert small["significant"] and not small["drift"] and small["decided_by"] == "effect"
    assert 0.03 < small["effect"] < 0.1 and small["threshold"] == 0.1
    assert large["drift"] and large["effect"] > 0.5


def test_error_rates_drift_when_the_change_is_large():
    """1.00% against 1.05% errors over a million rows: significant in the full counts,
    not in 10,000 rows, and small; 1% against 3% drifts."""
    rng = np.random.default_rng(4)
    ref = run(1_000_000, shifted(0), rng, errors=10_000)
    full = np.array([[10_000, 990_000], [10_500, 989_500]])
    assert chi2_contingency(full).pvalue < 0.01
    same = compare(ref, run(1_000_000, shifted(0), rng, errors=10_500))["tests"]["errors"]
    assert not same["drift"] and same["effect"] < 0.01
    more = compare(ref, run(1_000_000, shifted(0), rng, errors=30_000))["tests"]["errors"]
    assert more["drift"] and more["effect"] > 0.03


def test_thresholds_are_settable_and_reported():
    rng = np.random.default_rng(5)
    ref, cur = run(1_000_000, shifted(0), rng), run(1_000_000, shifted(0.10), rng)
    relaxed = compare(ref, cur, thresholds=DriftThresholds(class_threshold=0.1))
    assert not relaxed["drift"] and relaxed["tests"]["classes"]["decided_by"] == "effect"
    assert relaxed["thresholds"] == {"classes": 0.1, "confidence": 0.1, "errors": 0.03, "embeddings": 0.005}
    with pytest.raises(ValueError, match="0 or more"):
        DriftThresholds(embedding_threshold=-1)


def test_decide_names_what_the_verdict_rests_on():
    def verdict(p, effect):
        return decide({"p_value": p, "effect": effect}, alpha=0.01, threshold=0.1)

    assert verdict(0.001, 0.2)["drift"] and verdict(0.001, 0.2)["decided_by"] == "p-value and effect"
    assert verdict(0.001, 0.1)["drift"]  # the threshold itself is enough
    assert verdict(0.5, 0.2) == {"threshold": 0.1, "significant": False, "large": True, "drift": False,
                                 "decided_by": "p-value"}
    assert verdict(0.001, 0.05)["decided_by"] == "effect"
    assert verdict(0.5, 0.05)["decided_by"] == "p-value and effect" and not verdict(0.5, 0.05)["drift"]


def test_subsample_counts_draws_a_fixed_number_of_rows():
    table = np.array([[600_000, 400_000], [30, 70]])
    cut = subsample_counts(table, 10_000, seed=0)
    assert cut[0].sum() == 10_000 and abs(cut[0, 0] - 6000) < 300 and (cut[1] == table[1]).all()
