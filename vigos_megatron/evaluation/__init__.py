"""Evaluation helpers shared by training's rollout-accuracy metric and ``tools/evaluate.py``.

* :func:`grade` ``(prediction, answer) -> bool``: the rule-based answer check.
* :func:`rollout_correct` ``(completion, reference_answer) -> bool``: last ``\\boxed{}`` + :func:`grade`.
* :func:`pass_and_avg_at_k` ``(grades, k) -> (pass_at_k, avg_at_k)``: unbiased Pass@k and Avg@k.
"""

from vigos_megatron.evaluation.grading import grade, normalize_prediction, rollout_correct
from vigos_megatron.evaluation.metrics import pass_and_avg_at_k, pass_at_k

__all__ = ["grade", "normalize_prediction", "rollout_correct", "pass_and_avg_at_k", "pass_at_k"]
