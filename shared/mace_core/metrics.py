"""The paper's scores (percentages in [0, 100]). Plain arithmetic, no model."""

from __future__ import annotations


def harmonic_object(acc_e: float, acc_s: float, acc_g: float) -> float:
    """H_o = 3 / (1/(100 - Acc_e) + 1/Acc_s + 1/(100 - Acc_g)); 0 when any term is 0."""
    terms = (100.0 - acc_e, acc_s, 100.0 - acc_g)
    if min(terms) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / t for t in terms)


def harmonic_celebrity(acc_e: float, acc_retained: float) -> float:
    """H_c = 2 / (1/(100 - Acc_e) + 1/Acc_retained)."""
    terms = (100.0 - acc_e, acc_retained)
    if min(terms) <= 0:
        return 0.0
    return 2.0 / sum(1.0 / t for t in terms)


def accuracy(predicted: list[str], target: str) -> float:
    """Percentage of predictions equal to ``target``."""
    return 100.0 * sum(p == target for p in predicted) / max(1, len(predicted))
