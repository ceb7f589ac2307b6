"""proxy.humaneval.agreement: kappas and alpha against hand computations and textbook values, position-free labels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from proxy.humaneval.agreement import (
    HUMAN_MAJORITY,
    LABELS,
    cohen_pairs,
    fleiss,
    judge_agreement,
    krippendorff_alpha,
    model_label,
    with_majority,
)
from proxy.humaneval.ratings import Vote

# Every comparison in these tests is between "x" and "y"; sorted, "x" is "first".
PAIR = ("x", "y")


def labelled(cid: str, evaluator: str, label: str, *, swap: bool = False, ts: float = 0.0) -> Vote:
    """A vote whose position-free label is `label`; with `swap`, y is shown on the left."""
    left, right = ("y", "x") if swap else ("x", "y")
    winner = {"first": "x", "second": "y", "tie": None}[label]
    choice = "tie" if winner is None else "A" if winner == left else "B"
    return Vote(cid, evaluator, left, right, choice, ts)  # type: ignore[arg-type]


def rater_votes(labels: dict[str, list[str]]) -> list[Vote]:
    """evaluator -> one label per comparison c0, c1, ...; sides alternate per vote so positions vary."""
    votes = []
    for n, (evaluator, row) in enumerate(sorted(labels.items())):
        for i, label in enumerate(row):
            votes.append(labelled(f"c{i}", evaluator, label, swap=(i + n) % 2 == 1, ts=float(i)))
    return votes


def hand_fleiss(table: np.ndarray) -> float:
    """Fleiss (1971): P_i = (sum_j n_ij^2 - n) / (n (n - 1)), p_j = column share, kappa = (P - P_e) / (1 - P_e)."""
    n = table.sum(axis=1)[0]
    p_i = ((table**2).sum(axis=1) - n) / (n * (n - 1))
    p_j = table.sum(axis=0) / table.sum()
    p_bar, p_e = p_i.mean(), (p_j**2).sum()
    return float((p_bar - p_e) / (1 - p_e))


def hand_alpha(counts: np.ndarray) -> float:
    """Nominal Krippendorff alpha from unit-by-value counts: 1 - (n - 1) sum_{c!=k} o_ck / sum_{c!=k} n_c n_k.

    o_ck = sum over units with m_u >= 2 raters of (pairs of values c, k in the unit) / (m_u - 1).
    """
    counts = counts[counts.sum(axis=1) >= 2]
    values = counts.shape[1]
    o = np.zeros((values, values))
    for row in counts:
        m = row.sum()
        for c, k in itertools.product(range(values), repeat=2):
            o[c, k] += row[c] * (row[k] - (c == k)) / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    off = ~np.eye(values, dtype=bool)
    return float(1 - (n - 1) * o[off].sum() / np.outer(n_c, n_c)[off].sum())


class TestModelLabel:
    def test_position_free(self) -> None:
        """Preferring x from the left or from the right is the same label; so is a tie either way."""
        left = Vote("c", "e", "x", "y", "A", 0.0)
        right = Vote("c", "e", "y", "x", "B", 0.0)
        assert model_label(left, PAIR) == model_label(right, ("y", "x")) == "first"
        assert model_label(Vote("c", "e", "y", "x", "A", 0.0), PAIR) == "second"
        assert model_label(Vote("c", "e", "y", "x", "tie", 0.0), PAIR) == "tie"

    def test_wrong_pair(self) -> None:
        """A vote about other models has no label for this pair."""
        with pytest.raises(ValueError, match="not about the pair"):
            model_label(Vote("c", "e", "x", "z", "A", 0.0), PAIR)


class TestCohenPairs:
    def test_hand_computed_kappa(self) -> None:
        """6 shared items: p_o = 5/6, p_e = (3*2 + 2*3 + 1*1) / 36 = 13/36, kappa = (30 - 13) / (36 - 13) = 17/23."""
        votes = rater_votes(
            {
                "ann": ["first", "first", "second", "second", "tie", "first"],
                "bob": ["first", "second", "second", "second", "tie", "first"],
            }
        )
        (pair,) = cohen_pairs(votes)
        assert (pair.a, pair.b, pair.shared, pair.flag) == ("ann", "bob", 6, False)
        assert pair.kappa == pytest.approx(17 / 23, rel=1e-12)

    def test_matches_sklearn_and_flags_low_kappa(self) -> None:
        """Three raters, twelve items: each pair's kappa equals sklearn's on the label lists; under 0.4 is flagged."""
        rows = {
            "ann": "first first second tie first second second first tie first second first".split(),
            "bob": "first first second tie first second first first tie first second second".split(),
            "cat": "second tie first first second first second tie first second first first".split(),
        }
        results = {(p.a, p.b): p for p in cohen_pairs(rater_votes(rows))}
        assert set(results) == {("ann", "bob"), ("ann", "cat"), ("bob", "cat")}
        for (a, b), pair in results.items():
            assert pair.kappa == pytest.approx(cohen_kappa_score(rows[a], rows[b], labels=list(LABELS)), rel=1e-12)
            assert pair.shared == 12 and pair.flag == (pair.kappa is not None and pair.kappa < 0.4)
        assert not results["ann", "bob"].flag and results["ann", "cat"].flag

    def test_sides_do_not_matter(self) -> None:
        """Two raters who always prefer the same model, each shown it on a different side, agree perfectly."""
        labels = ["first", "second", "tie", "first", "second"]
        votes = [labelled(f"c{i}", "ann", label) for i, label in enumerate(labels)]
        votes += [labelled(f"c{i}", "bob", label, swap=True) for i, label in enumerate(labels)]
        assert all(v.choice != w.choice for v, w in zip(votes[:5], votes[5:], strict=True) if v.choice != "tie")
        (pair,) = cohen_pairs(votes)
        assert pair.kappa == 1.0

    def test_too_few_shared_or_undefined(self) -> None:
        """Under min_shared items, or one label throughout, kappa is None and nothing is flagged."""
        few = rater_votes({"ann": ["first", "second", "tie"], "bob": ["second", "first", "first"]})
        assert cohen_pairs(few)[0].kappa is None and not cohen_pairs(few)[0].flag
        assert cohen_pairs(few, min_shared=3)[0].kappa is not None
        same = rater_votes({"ann": ["first"] * 6, "bob": ["first"] * 6})
        (pair,) = cohen_pairs(same)
        assert pair.kappa is None and pair.shared == 6 and not pair.flag

    def test_latest_vote_counts(self) -> None:
        """A re-vote replaces the evaluator's earlier answer on that comparison."""
        ann = "first second tie first second".split()
        votes = rater_votes({"ann": ann, "bob": ann})
        votes.append(labelled("c0", "bob", "second", ts=99.0))
        (pair,) = cohen_pairs(votes)
        bob = "second second tie first second".split()
        assert (
            pair.kappa == pytest.approx(cohen_kappa_score(ann, bob, labels=list(LABELS)), rel=1e-12) and pair.kappa < 1
        )

    def test_inconsistent_comparison_rejected(self) -> None:
        """A comparison id used for two different model pairs is an error."""
        votes = [Vote("c", "ann", "x", "y", "A", 0.0), Vote("c", "bob", "x", "z", "A", 1.0)]
        with pytest.raises(ValueError, match="comparison 'c'"):
            cohen_pairs(votes)


class TestFleiss:
    # Fleiss' kappa article, Wikipedia: 10 subjects, 14 raters, 5 categories; kappa = 0.210.
    WIKIPEDIA = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )

    def test_hand_formula_reproduces_textbook(self) -> None:
        """The test's own formula gives the published 0.210 (P = 0.378, P_e = 0.213), so it can check fleiss()."""
        assert hand_fleiss(self.WIKIPEDIA) == pytest.approx(0.2099, abs=5e-4)

    def test_votes_to_kappa(self) -> None:
        """Votes -> first three raters by time per comparison -> Fleiss' kappa equals the hand formula on the table."""
        items = [
            ["first", "first", "first"],
            ["first", "first", "second"],
            ["second", "second", "tie"],
            ["tie", "tie", "tie"],
            ["first", "second", "tie"],
            ["second", "second", "second", "first"],  # 4th rater (latest) is dropped
            ["first", "tie", "first"],
        ]
        votes = []
        for i, labels in enumerate(items):
            for r, label in enumerate(labels):
                votes.append(labelled(f"c{i}", f"e{(i + r) % 5}", label, swap=r == 1, ts=float(10 * i + r)))
        votes.append(labelled("lonely", "e0", "first"))  # one rater: not eligible
        # Counts of (first, tie, second) per comparison, by hand from `items` (first three raters).
        table = np.array([[3, 0, 0], [2, 0, 1], [0, 1, 2], [0, 3, 0], [1, 1, 1], [0, 0, 3], [2, 1, 0]])
        assert fleiss(votes, min_raters=3) == pytest.approx(hand_fleiss(table), rel=1e-12)
        # With two raters each, every comparison counts with its first two votes.
        pairs = np.array([[2, 0, 0], [2, 0, 0], [0, 0, 2], [0, 2, 0], [1, 0, 1], [0, 0, 2], [1, 1, 0]])
        assert fleiss(votes) == pytest.approx(hand_fleiss(pairs), rel=1e-12)

    def test_undefined_or_empty(self) -> None:
        """One label throughout, or no comparison with enough raters: None."""
        assert fleiss(rater_votes({"a": ["tie"] * 3, "b": ["tie"] * 3})) is None
        assert fleiss([labelled("c", "a", "first")]) is None
        with pytest.raises(ValueError, match="min_raters"):
            fleiss([], min_raters=1)


class TestKrippendorff:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal example: alpha = 0.691.
    CANONICAL = np.array(
        [
            [1, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 2, 0, 0],
            [2, 0, 0, 0],
            [0, 0, 2, 0],
            [0, 0, 2, 1],
            [0, 0, 0, 3],
            [1, 0, 1, 0],
            [0, 2, 0, 0],
            [2, 0, 0, 0],
            [2, 0, 0, 0],
            [0, 0, 2, 0],
            [0, 0, 2, 0],
            [0, 0, 0, 0],
            [0, 0, 1, 1],
        ]
    )

    def test_hand_formula_reproduces_textbook(self) -> None:
        """The test's coincidence-matrix formula gives Krippendorff's published 0.691."""
        assert hand_alpha(self.CANONICAL) == pytest.approx(0.691, abs=5e-4)

    def test_votes_to_alpha(self) -> None:
        """Unequal raters per comparison, all used: alpha equals the hand formula on the counts."""
        items = [["first", "first", "tie"], ["second", "second"], ["tie", "first", "first", "first"], ["second"]]
        votes = [
            labelled(f"c{i}", f"e{r}", label, swap=r % 2 == 0)
            for i, row in enumerate(items)
            for r, label in enumerate(row)
        ]
        counts = np.array([[2, 1, 0], [0, 0, 2], [3, 1, 0], [0, 0, 1]])
        assert krippendorff_alpha(votes) == pytest.approx(hand_alpha(counts), rel=1e-9)

    def test_undefined(self) -> None:
        """No comparison with two raters, or a single label: None."""
        assert krippendorff_alpha([labelled("c", "a", "first")]) is None
        assert krippendorff_alpha(rater_votes({"a": ["tie"] * 3, "b": ["tie"] * 3})) is None


class TestWithMajority:
    def test_leave_one_out(self) -> None:
        """Worked by hand below; a tied majority of the others and comparisons with one other rater are skipped."""
        rows = {
            # c0: all others agree on first, except for dan who is out-voted.
            # c1: three different labels, so no one has a majority of the others.
            # c2: ann, bob, dan say second (cat did not vote).
            # c3: only ann and bob: one other rater each, skipped.
            "ann": ["first", "first", "second", "tie"],
            "bob": ["first", "second", "second", "tie"],
            "cat": ["first", "tie"],
            "dan": ["second", "first", "second"],
        }
        votes = rater_votes(rows)
        votes.append(labelled("c0", "judge:gpt", "second"))
        result = {m.evaluator: m for m in with_majority(votes)}
        # ann: c0 others (bob first, cat first, dan second) -> first, agrees; c1 others (second, tie, first) tied:
        # skip; c2 others (bob second, dan second) -> second, agrees. 2 of 2.
        assert (result["ann"].agreement, result["ann"].shared) == (1.0, 2)
        # bob: c0 -> first agrees; c1 others (first, tie, first) -> first, bob said second; c2 agrees. 2 of 3.
        assert (result["bob"].agreement, result["bob"].shared) == pytest.approx((2 / 3, 3))
        # cat: c0 others (first, first, second) -> first agrees; c1 others (first, second, first) -> first, cat tie.
        assert (result["cat"].agreement, result["cat"].shared) == (0.5, 2)
        # dan: c0 others (first x3) -> first, dan second; c1 others (first, second, tie) tied: skip; c2 agrees.
        assert (result["dan"].agreement, result["dan"].shared) == (0.5, 2)
        assert "judge:gpt" not in result

    def test_judges_included_on_request(self) -> None:
        """exclude_judges=False: the judge is an evaluator like any other."""
        votes = [*rater_votes({"ann": ["first"], "bob": ["first"]}), labelled("c0", "judge:gpt", "second")]
        result = {m.evaluator: m for m in with_majority(votes, exclude_judges=False)}
        assert (result["judge:gpt"].agreement, result["judge:gpt"].shared) == (0.0, 1)
        assert result["ann"].shared == 0 and result["ann"].agreement is None  # others: bob first, judge second


class TestJudgeAgreement:
    def test_against_human_majority(self) -> None:
        """The judge's labels against each comparison's human majority: Cohen's kappa of those two lists."""
        humans = rater_votes(
            {
                "ann": ["first", "second", "tie", "first", "second", "first", "first", "second"],
                "bob": ["first", "second", "tie", "second", "second", "second", "first", "tie"],
                "cat": ["first", "first", "tie", "first", "tie", "tie", "first"],
            }
        )
        judge = [
            labelled(f"c{i}", "judge:gpt", label, swap=i % 3 == 0)
            for i, label in enumerate(["first", "second", "first", "first", "second", "first", "second", "tie"])
        ]
        judge.append(labelled("c99", "judge:gpt", "first"))  # no human voted: left out
        # Human majority per comparison: c0 first, c1 second, c2 tie, c3 first, c4 second, c5 tied (first, second,
        # tie): left out, c6 first, c7 tied (second, tie): left out.
        judge_labels = ["first", "second", "first", "first", "second", "second"]
        majority = ["first", "second", "tie", "first", "second", "first"]
        result = judge_agreement(judge, humans)
        assert (result.a, result.b, result.shared) == ("judge:gpt", HUMAN_MAJORITY, 6)
        assert result.kappa == pytest.approx(cohen_kappa_score(judge_labels, majority, labels=list(LABELS)), rel=1e-12)
        assert result.flag == (result.kappa is not None and result.kappa < 0.4)

    def test_one_judge_only(self) -> None:
        """Votes from two judges at once are refused."""
        judges = [labelled("c0", "judge:a", "first"), labelled("c0", "judge:b", "first")]
        with pytest.raises(ValueError, match="exactly one"):
            judge_agreement(judges, [])
