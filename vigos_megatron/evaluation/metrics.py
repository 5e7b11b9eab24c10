"""Pass@k and Avg@k over k or more sampled answers per question (``../shared/METHOD.md`` section 5).

For a question with ``n`` graded samples of which ``c`` are correct, the unbiased estimator of
the probability that at least one of ``k`` samples drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

(1 when ``n - c < k``). The product form never forms the binomial coefficients, so it is
exact to rounding for any ``n``. Avg@k is the mean accuracy ``c / n``. Both are averaged over
questions (each question weighs the same; with the protocol's ``n = k`` samples for every
question, Avg@k is exactly the fraction of correct samples).
"""

from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question: ``1 - C(n-c, k) / C(n, k)`` in product form."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_and_avg_at_k(grades: Sequence[Sequence[bool]], k: int) -> tuple[float, float]:
    """``(Pass@k, Avg@k)``, both in ``[0, 1]``, averaged over questions.

    Args:
        grades: one list per question of its ``n >= k`` samples' grades (bool, or 0/1).
        k: samples per question the metric is about (``k >= 1``).

    Raises:
        ValueError: ``k < 1`` (or not an int), no question, a question with fewer than ``k``
            samples, or a grade that is not a bool / 0 / 1.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"pass_and_avg_at_k: k must be an int >= 1, got {k!r}")
    if len(grades) == 0:
        raise ValueError("pass_and_avg_at_k: grades is empty (no question)")
    pass_sum = avg_sum = 0.0
    for q, g in enumerate(grades):
        n = len(g)
        if n < k:
            raise ValueError(f"pass_and_avg_at_k: question {q} has {n} samples, fewer than k={k}")
        bad = [x for x in g if x not in (0, 1)]
        if bad:
            raise ValueError(f"pass_and_avg_at_k: question {q} has non-boolean grades {bad[:3]}")
        c = sum(1 for x in g if x)
        pass_sum += pass_at_k(n, c, k)
        avg_sum += c / n
    return pass_sum / len(grades), avg_sum / len(grades)
