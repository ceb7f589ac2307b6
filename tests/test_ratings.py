"""proxy.humaneval.ratings: Elo by hand, Bradley-Terry against simulation and an independent MLE, tests by scipy."""

from __future__ import annotations

import math
import random
from typing import ClassVar

import numpy as np
import pytest
from scipy import optimize, stats
from statsmodels.stats.proportion import proportion_confint

from proxy.humaneval.ratings import (
    ELO_K,
    ELO_START,
    Vote,
    bradley_terry,
    elo,
    elo_orderings,
    median_time_per_vote,
    pairwise,
    per_criterion,
    position_bias,
)


def vote(
    left: str,
    right: str,
    choice: str,
    ts: float = 0.0,
    *,
    evaluator: str = "e1",
    cid: str = "c",
    ms: float | None = None,
    rubric: dict[str, str | int] | None = None,
) -> Vote:
    return Vote(cid, evaluator, left, right, choice, ts, ms, rubric or {})  # type: ignore[arg-type]


def expected(r_a: float, r_b: float) -> float:
    """The reference formula, REFERENCE.md "Ratings": E_A = 1 / (1 + 10^((R_B - R_A) / 400))."""
    return 1 / (1 + 10 ** ((r_b - r_a) / 400))


def simulate(strengths: dict[str, float], n: int, seed: int, *, skip: frozenset[str] = frozenset()) -> list[Vote]:
    """n votes between random pairs (none of the pairs in `skip`), outcomes drawn from the Elo/BT probabilities."""
    rng = np.random.default_rng(seed)
    names = sorted(strengths)
    votes = []
    while len(votes) < n:
        i, j = rng.choice(len(names), size=2, replace=False)
        left, right = names[i], names[j]
        if frozenset((left, right)) in skip:
            continue
        choice = "A" if rng.random() < expected(strengths[left], strengths[right]) else "B"
        votes.append(vote(left, right, choice, float(len(votes))))
    return votes


def anchored(strengths: dict[str, float]) -> dict[str, float]:
    mean = sum(strengths.values()) / len(strengths)
    return {m: r - mean + 1500 for m, r in strengths.items()}


class TestVote:
    def test_winner_and_loser(self) -> None:
        """winner/loser name models by the side chosen; a tie has neither."""
        assert (vote("x", "y", "A").winner, vote("x", "y", "A").loser) == ("x", "y")
        assert (vote("x", "y", "B").winner, vote("x", "y", "B").loser) == ("y", "x")
        assert (vote("x", "y", "tie").winner, vote("x", "y", "tie").loser) == (None, None)

    def test_rejects_bad_votes(self) -> None:
        """A model against itself or an unknown choice is refused at construction."""
        with pytest.raises(ValueError, match="two different models"):
            vote("x", "x", "A")
        with pytest.raises(ValueError, match="choice"):
            vote("x", "y", "left")

    def test_hashable_with_rubric(self) -> None:
        """A vote with a rubric dict can still be put in a set."""
        assert len({vote("x", "y", "A", rubric={"c": "A"}), vote("x", "y", "A", rubric={"c": "A"})}) == 1


class TestElo:
    def test_three_votes_by_hand(self) -> None:
        """x beats y, x ties z, z beats y: the reference update written out step by step; given out of ts order."""
        votes = [
            vote("y", "z", "B", ts=3.0),  # 3rd: z (right) beats y (left)
            vote("x", "y", "A", ts=1.0),  # 1st: x beats y
            vote("z", "x", "tie", ts=2.0),  # 2nd: tie
        ]
        k = 32
        # 1: 1500 v 1500, E = 0.5 each: x = 1500 + 32 * (1 - 0.5) = 1516, y = 1500 + 32 * (0 - 0.5) = 1484.
        x, y, z = 1500 + k * (1 - 0.5), 1500 + k * (0 - 0.5), 1500.0
        assert (x, y) == (1516, 1484)
        # 2: tie, each scores 0.5. E_x = 1 / (1 + 10^((1500 - 1516) / 400)) = 0.523010: x gives 32 * 0.023010 to z.
        e_x = expected(x, z)
        x, z = x + k * (0.5 - e_x), z + k * (0.5 - (1 - e_x))
        assert (x, z) == pytest.approx((1515.26369, 1500.73631), abs=1e-5)
        # 3: z beats y. E_y = 1 / (1 + 10^((1500.73631 - 1484) / 400)) = 0.475933: y = 1484 - 32 * 0.475933.
        e_y = expected(y, z)
        y, z = y + k * (0 - e_y), z + k * (1 - (1 - e_y))
        assert (y, z) == pytest.approx((1468.77014, 1515.96617), abs=1e-5)
        assert elo(votes) == pytest.approx({"x": x, "y": y, "z": z}, abs=1e-9)

    def test_tie_scores_half(self) -> None:
        """A tie between equals changes nothing; between unequals it moves the stronger one down by K * (E - 0.5)."""
        assert elo([vote("x", "y", "tie")]) == {"x": 1500.0, "y": 1500.0}
        ratings = elo([vote("x", "y", "A", 1.0), vote("x", "y", "tie", 2.0)])
        e_x = expected(1516, 1484)
        assert ratings["x"] == pytest.approx(1516 + ELO_K * (0.5 - e_x), abs=1e-12)

    def test_order_matters(self) -> None:
        """The same two votes in two orders give different final ratings: the last winner ends on top."""
        first = elo([vote("x", "y", "A", 1.0), vote("x", "y", "B", 2.0)])
        second = elo([vote("x", "y", "A", 2.0), vote("x", "y", "B", 1.0)])
        assert first["y"] > first["x"] and second["x"] > second["y"]
        assert first["x"] == pytest.approx(second["y"])

    def test_equal_ts_keeps_input_order(self) -> None:
        """Votes with equal ts are applied in the order given (stable sort)."""
        votes = [vote("x", "y", "A", 5.0), vote("x", "y", "B", 5.0)]
        assert elo(votes) == elo([vote("x", "y", "A", 1.0), vote("x", "y", "B", 2.0)])

    def test_models_without_votes_and_parameters(self) -> None:
        """Listed models without votes stay at `start`; k and start are honoured."""
        ratings = elo([vote("x", "y", "A")], ["w", "x", "y"], k=10, start=1000)
        assert ratings == {"w": 1000, "x": 1005, "y": 995}
        assert list(ratings) == ["w", "x", "y"]
        assert ELO_START == 1500 and ELO_K == 32


class TestEloOrderings:
    def test_order_free_and_contains_single_order(self) -> None:
        """The summary is identical for a shuffled input, and its interval holds the one-order Elo."""
        votes = simulate({"x": 1600, "y": 1500, "z": 1450}, 120, seed=3)
        shuffled = votes[:]
        random.Random(7).shuffle(shuffled)
        summary = elo_orderings(votes, rounds=300)
        assert elo_orderings(shuffled, rounds=300) == summary
        single = elo(votes)
        for model, (mean, sd, low, high) in summary.items():
            assert low <= single[model] <= high
            assert low < mean < high and sd > 0

    def test_single_round_is_one_ordering(self) -> None:
        """With one round the summary is elo() of one of the two orders: sd 0, mean and percentiles equal to it."""
        votes = [vote("x", "y", "A", 1.0), vote("x", "y", "B", 2.0)]
        orders = [elo(votes)["x"], elo([vote("x", "y", "A", 2.0), vote("x", "y", "B", 1.0)])["x"]]
        mean, sd, low, high = elo_orderings(votes, rounds=1, seed=1)["x"]
        assert sd == 0 and mean == low == high
        assert any(mean == pytest.approx(o, abs=1e-9) for o in orders)

    def test_two_orderings_statistics(self) -> None:
        """Two votes have two orders; over many rounds the mean is their average and the percentiles their values."""
        votes = [vote("x", "y", "A", 1.0), vote("x", "y", "B", 2.0)]
        ends = sorted([elo(votes)["x"], elo([vote("x", "y", "A", 2.0), vote("x", "y", "B", 1.0)])["x"]])
        mean, _, low, high = elo_orderings(votes, rounds=2000)["x"]
        assert mean == pytest.approx(sum(ends) / 2, abs=0.1)
        assert (low, high) == pytest.approx(tuple(ends))


class TestBradleyTerry:
    STRENGTHS: ClassVar[dict[str, float]] = {"m1": 1400.0, "m2": 1500.0, "m3": 1550.0, "m4": 1650.0}

    def test_recovers_simulated_strengths(self) -> None:
        """4,000 simulated votes: every rating within 25 points of the truth (mean-anchored), every CI covers it."""
        truth = anchored(self.STRENGTHS)
        ratings = bradley_terry(simulate(self.STRENGTHS, 4000, seed=11), bootstrap=1000)
        assert [r.model for r in ratings] == ["m4", "m3", "m2", "m1"]
        assert sum(r.rating for r in ratings) / 4 == pytest.approx(1500, abs=1e-9)
        for r in ratings:
            assert r.rating == pytest.approx(truth[r.model], abs=25)
            assert r.ci[0] < truth[r.model] < r.ci[1]
            assert r.ci[0] < r.rating < r.ci[1]
        assert sum(r.games for r in ratings) == 2 * 4000

    def test_interval_width_matches_fisher_information(self) -> None:
        """Bootstrap interval widths are within 15 % of 2 x 1.96 x the asymptotic SE from the Fisher information."""
        votes = simulate(self.STRENGTHS, 4000, seed=11)
        ratings = {r.model: r for r in bradley_terry(votes, bootstrap=1000)}
        names = sorted(self.STRENGTHS)
        beta = np.array([ratings[m].rating for m in names]) * math.log(10) / 400
        # I = sum over votes of p(1 - p) d d^T, d = e_i - e_j; the ratings are mean-centred, whose covariance is
        # the pseudo-inverse of I (I's null space is the common shift).
        info = np.zeros((4, 4))
        for v in votes:
            d = np.zeros(4)
            d[names.index(v.model_a)], d[names.index(v.model_b)] = 1.0, -1.0
            p = 1 / (1 + math.exp(-(d @ beta)))
            info += p * (1 - p) * np.outer(d, d)
        se = np.sqrt(np.diag(np.linalg.pinv(info, rcond=1e-10, hermitian=True))) * 400 / math.log(10)
        for model, s in zip(names, se, strict=True):
            low, high = ratings[model].ci
            assert (high - low) / (2 * stats.norm.ppf(0.975) * s) == pytest.approx(1.0, abs=0.15)

    def test_transitive_through_a_common_opponent(self) -> None:
        """a beat b 7-3 and b beat c 7-3, a and c never met: a > b > c, each gap 400 log10(7/3) (the chain's MLE)."""
        votes = [vote("a", "b", "A")] * 7 + [vote("a", "b", "B")] * 3
        votes += [vote("c", "b", "B")] * 7 + [vote("c", "b", "A")] * 3
        ratings = {r.model: r.rating for r in bradley_terry(votes, bootstrap=0)}
        gap = 400 * math.log10(7 / 3)
        assert ratings == pytest.approx({"a": 1500 + gap, "b": 1500.0, "c": 1500 - gap}, abs=1e-3)

    def test_ties_are_half_wins(self) -> None:
        """Even wins plus ties: 1500 each. 2 wins + 2 ties are 3 half-win units to 1: 400 log10 3 apart, like 3-1."""
        even = bradley_terry([vote("x", "y", "A"), vote("y", "x", "A"), vote("x", "y", "tie")] * 2, bootstrap=0)
        assert [r.rating for r in even] == pytest.approx([1500.0, 1500.0], abs=1e-6)
        with_ties = [vote("x", "y", "A"), vote("y", "x", "B"), vote("x", "y", "tie"), vote("y", "x", "tie")]
        half = {r.model: r.rating for r in bradley_terry(with_ties, bootstrap=0)}
        three_one = [vote("x", "y", "A")] * 3 + [vote("x", "y", "B")]
        plain = {r.model: r.rating for r in bradley_terry(three_one, bootstrap=0)}
        assert half["x"] - half["y"] == pytest.approx(400 * math.log10(3), abs=1e-3)
        assert half == pytest.approx(plain, abs=1e-6)

    def test_matches_independent_mle(self) -> None:
        """On an incomplete tournament with ties, ratings equal a scipy fit of the BT log-likelihood within 1e-3."""
        strengths = {"p": 1420.0, "q": 1500.0, "r": 1530.0, "s": 1600.0, "t": 1610.0}
        votes = simulate(strengths, 300, seed=5, skip=frozenset({frozenset(("p", "t")), frozenset(("q", "s"))}))
        votes += [vote("p", "q", "tie"), vote("s", "t", "tie"), vote("r", "t", "tie")] * 4
        names = sorted(strengths)
        # Negative log-likelihood in logits, ties as half a win each: -sum w * log sigmoid(beta_win - beta_lose).
        rows = []
        for v in votes:
            i, j = names.index(v.model_a), names.index(v.model_b)
            if v.choice == "tie":
                rows += [(i, j, 0.5), (j, i, 0.5)]
            else:
                w, l_ = (i, j) if v.choice == "A" else (j, i)
                rows.append((w, l_, 1.0))
        win, lose, weight = (np.array(c) for c in zip(*rows, strict=True))

        def nll(beta: np.ndarray) -> float:
            return float(np.sum(weight * np.logaddexp(0.0, -(beta[win] - beta[lose]))))

        fit = optimize.minimize(nll, np.zeros(len(names)), method="BFGS", options={"gtol": 1e-10})
        beta = fit.x - fit.x.mean()
        expected_ratings = dict(zip(names, 1500 + beta * 400 / math.log(10), strict=True))
        ratings = {r.model: r.rating for r in bradley_terry(votes, bootstrap=0)}
        assert ratings == pytest.approx(expected_ratings, abs=1e-3)

    def test_bootstrap_intervals_reproducible_and_optional(self) -> None:
        """Same seed, same intervals; bootstrap=0 gives (nan, nan) and the same point ratings."""
        votes = simulate({"x": 1550, "y": 1500, "z": 1450}, 200, seed=2)
        first, again = bradley_terry(votes, bootstrap=200, seed=4), bradley_terry(votes, bootstrap=200, seed=4)
        assert first == again
        bare = bradley_terry(votes, bootstrap=0)
        assert [r.rating for r in bare] == pytest.approx([r.rating for r in first])
        assert all(math.isnan(r.ci[0]) and math.isnan(r.ci[1]) for r in bare)

    def test_interval_width_shrinks_with_data(self) -> None:
        """Four times the votes roughly halve the interval (within 0.35-0.65 of the width)."""
        strengths = {"x": 1550.0, "y": 1500.0, "z": 1450.0}
        small = {r.model: r.ci for r in bradley_terry(simulate(strengths, 300, seed=8), bootstrap=400)}
        large = {r.model: r.ci for r in bradley_terry(simulate(strengths, 1200, seed=8), bootstrap=400)}
        for model in strengths:
            ratio = (large[model][1] - large[model][0]) / (small[model][1] - small[model][0])
            assert 0.35 < ratio < 0.65

    def test_disconnected_graph_raises(self) -> None:
        """Two groups that never met cannot be put on one scale: ValueError naming both components."""
        votes = [vote("a", "b", "A"), vote("b", "a", "A"), vote("c", "d", "A"), vote("d", "c", "tie")]
        with pytest.raises(ValueError, match=r"\{a, b\} \| \{c, d\}"):
            bradley_terry(votes, bootstrap=0)
        with pytest.raises(ValueError, match=r"\{z\}"):
            bradley_terry(votes[:2], ["a", "b", "z"], bootstrap=0)

    def test_needs_two_models(self) -> None:
        """No votes: ValueError rather than an empty or meaningless fit."""
        with pytest.raises(ValueError, match="at least two"):
            bradley_terry([], bootstrap=0)


class TestPairwise:
    def test_counts_intervals_and_sign_test(self) -> None:
        """x v y with sides mixed: 5 wins, 2 ties, 3 losses for x; Wilson CIs and sign test from the raw counts."""
        votes = (
            [vote("x", "y", "A")] * 3  # x wins from the left
            + [vote("y", "x", "B")] * 2  # x wins from the right
            + [vote("x", "y", "tie"), vote("y", "x", "tie")]
            + [vote("y", "x", "A")] * 2  # y wins from the left
            + [vote("x", "y", "B")]  # y wins from the right
            + [vote("z", "x", "A")]  # another pair
        )
        xy, xz = pairwise(votes)
        assert (xy.model, xy.other, xy.wins, xy.ties, xy.losses) == ("x", "y", 5, 2, 3)
        assert (xy.win_rate, xy.tie_rate, xy.loss_rate) == (0.5, 0.2, 0.3)
        assert xy.win_ci == pytest.approx(proportion_confint(5, 10, alpha=0.05, method="wilson"), rel=1e-12)
        assert xy.tie_ci == pytest.approx(proportion_confint(2, 10, alpha=0.05, method="wilson"), rel=1e-12)
        assert xy.loss_ci == pytest.approx(proportion_confint(3, 10, alpha=0.05, method="wilson"), rel=1e-12)
        assert xy.sign_test_p == pytest.approx(stats.binomtest(5, 8, 0.5).pvalue, rel=1e-12)
        assert (xz.model, xz.other, xz.wins, xz.losses) == ("x", "z", 0, 1)

    def test_focus_model_reported_first(self) -> None:
        """With focus="y" the x-y pair reads from y's side: its wins are x's losses."""
        votes = [vote("x", "y", "A")] * 3 + [vote("x", "y", "B")]
        (result,) = pairwise(votes, focus="y")
        assert (result.model, result.other, result.wins, result.losses) == ("y", "x", 1, 3)

    def test_only_ties_has_no_sign_test(self) -> None:
        """All ties: no decisive vote, sign test p None, tie rate 1."""
        (result,) = pairwise([vote("x", "y", "tie")] * 4)
        assert result.sign_test_p is None and result.tie_rate == 1.0


class TestPerCriterion:
    def test_preference_and_score(self) -> None:
        """A preference criterion maps A/B to models; a score criterion gives means and Wilcoxon on the pairs."""
        votes = [
            vote("x", "y", "A", rubric={"accuracy": "A", "clarity.A": 5, "clarity.B": 3}),
            vote("y", "x", "B", rubric={"accuracy": "A", "clarity.A": 2, "clarity.B": 4}),
            vote("x", "y", "A", rubric={"accuracy": "tie", "clarity.A": 4, "clarity.B": 4}),
            vote("y", "x", "A", rubric={"accuracy": "B", "clarity.A": 3, "clarity.B": 4}),
            vote("x", "y", "B", rubric={"accuracy": "A", "clarity.A": 5, "clarity.B": 2}),
            vote("x", "y", "B", rubric={"clarity.A": 3, "clarity.B": 4}),
            vote("x", "y", "A"),  # no rubric answers: counted for neither criterion
        ]
        accuracy, clarity = per_criterion(votes, {"accuracy": "preference", "clarity": "score"})
        # accuracy from x's side: A(x), A(y) = loss, tie, B(x) = win, A(x) = win -> 3 wins, 1 tie, 1 loss.
        assert (accuracy.criterion, accuracy.model, accuracy.other) == ("accuracy", "x", "y")
        assert (accuracy.wins, accuracy.ties, accuracy.losses) == (3, 1, 1)
        assert accuracy.win_ci == pytest.approx(proportion_confint(3, 5, method="wilson"), rel=1e-12)
        assert accuracy.sign_test_p == pytest.approx(stats.binomtest(3, 4).pvalue, rel=1e-12)
        assert accuracy.mean_score is None and accuracy.other_mean_score is None
        # clarity, x's and y's scores per vote (x is on the right in votes 2 and 4).
        x_scores, y_scores = [5, 4, 4, 4, 5, 3], [3, 2, 4, 3, 2, 4]
        assert (clarity.wins, clarity.ties, clarity.losses) == (4, 1, 1)
        assert clarity.mean_score == pytest.approx(np.mean(x_scores))
        assert clarity.other_mean_score == pytest.approx(np.mean(y_scores))
        assert clarity.sign_test_p == pytest.approx(stats.wilcoxon(x_scores, y_scores).pvalue, rel=1e-12)

    def test_all_equal_scores_have_no_test(self) -> None:
        """Every pair of scores equal: no signed-rank test, p None."""
        (result,) = per_criterion([vote("x", "y", "A", rubric={"c.A": 3, "c.B": 3})] * 3, {"c": "score"})
        assert result.sign_test_p is None and result.ties == 3

    def test_rejects_bad_input(self) -> None:
        """Unknown kinds, out-of-range scores and unknown answers are errors, not silently skipped."""
        with pytest.raises(ValueError, match="kind"):
            per_criterion([], {"c": "stars"})
        with pytest.raises(ValueError, match=r"1\.\.5"):
            per_criterion([vote("x", "y", "A", rubric={"c.A": 6, "c.B": 3})], {"c": "score"})
        with pytest.raises(ValueError, match="answer"):
            per_criterion([vote("x", "y", "A", rubric={"c": "left"})], {"c": "preference"})


class TestPositionBias:
    def test_seventy_of_hundred(self) -> None:
        """70 left and 30 right wins, 5 ties: share 0.7 and p = binomtest(70, 100) (about 7.9e-5)."""
        votes = [vote("x", "y", "A")] * 70 + [vote("x", "y", "B")] * 30 + [vote("x", "y", "tie")] * 5
        bias = position_bias(votes)
        assert (bias.left_share, bias.left_votes, bias.right_votes, bias.ties) == (0.7, 70, 30, 5)
        assert bias.p_value == pytest.approx(stats.binomtest(70, 100, 0.5).pvalue, rel=1e-12)
        assert bias.p_value == pytest.approx(7.85e-5, rel=1e-2)

    def test_no_decisive_votes(self) -> None:
        """Only ties: share nan, no test."""
        bias = position_bias([vote("x", "y", "tie")])
        assert math.isnan(bias.left_share) and bias.p_value is None


class TestMedianTime:
    def test_median_per_evaluator(self) -> None:
        """Median of timed votes per evaluator; untimed votes ignored, never-timed evaluators absent."""
        votes = [
            vote("x", "y", "A", evaluator="e1", ms=1000),
            vote("x", "y", "A", evaluator="e1", ms=3000),
            vote("x", "y", "A", evaluator="e1", ms=2000),
            vote("x", "y", "A", evaluator="e1"),
            vote("x", "y", "A", evaluator="e2", ms=500),
            vote("x", "y", "A", evaluator="e2", ms=1500),
            vote("x", "y", "A", evaluator="e3"),
        ]
        assert median_time_per_vote(votes) == {"e1": 2000.0, "e2": 1000.0}
