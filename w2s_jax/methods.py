"""The listable registry of methods: a head, a loss and what the loss is trained against."""
from __future__ import annotations

from typing import NamedTuple


class Method(NamedTuple):
    head: str  # "linear" (LP) or "prototype" (CPL-style cosine prototypes)
    loss: str  # name in w2s_jax.losses.LOSSES
    target: str  # "weak": weak logits on hold_train, model chosen by agreement on hold_val;
    #              "truth": ground truth on hold_train and hold_val (the strong ceiling)


METHODS = {
    # weak-to-strong on the linear probe (LP)
    "ce+lp": Method("linear", "ce", "weak"),
    "kd+lp": Method("linear", "kd", "weak"),
    "auxconf+lp": Method("linear", "auxconf", "weak"),
    "adaptconf+lp": Method("linear", "adaptconf", "weak"),
    "cpl+lp": Method("linear", "cpl", "weak"),
    # weak-to-strong on class prototypes
    "ce+proto": Method("prototype", "ce", "weak"),
    "kd+proto": Method("prototype", "kd", "weak"),
    "auxconf+proto": Method("prototype", "auxconf", "weak"),
    "adaptconf+proto": Method("prototype", "adaptconf", "weak"),
    "cpl": Method("prototype", "cpl", "weak"),
    # strong ceilings: the same heads trained on ground truth
    "ceiling+lp": Method("linear", "ce", "truth"),
    "ceiling+proto": Method("prototype", "ce", "truth"),
}


def check_methods(names) -> tuple[str, ...]:
    """``names`` as a tuple, or a ValueError listing the valid names."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)} (see w2s-fit --list-methods)")
    return tuple(names)
