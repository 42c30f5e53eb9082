"""The listable registry of methods: a head, a row of the loss family and what the loss is trained against.

Methods are data: a method is a head plus a row of coefficients (:class:`w2s_jax.losses.Coeffs`), so every model
of a seed trains in one vectorized step whatever the number of methods, and a user adds one with
:func:`define_method` (or ``[methods.NAME]`` in an experiment file) and no code.

One computation, one name. CPL is the paper's KL loss on text-initialised prototypes; KD on the same head
differs only by the constant factor T², which Adam's update ignores (it divides the gradient by its own
scale), so ``kd+proto`` would repeat ``cpl`` and is not registered; nor is ``cpl+lp``, which repeats
``kd+lp``. ``cpl`` is the prototype head's KD row.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import NamedTuple

from w2s_jax.heads import HEADS
from w2s_jax.losses import LOSSES, Coeffs, check_coeffs
from w2s_jax.refine import REFINEMENTS

TORCH_HEADS = ("prompt", "text-encoder")  # need the text encoder: w2s-tp; every head in heads.HEADS is w2s-fit's
MULTI_WEAK = ("raven", "average")  # targets that combine several weak models (w2s-fit --weak a,b,...)


class Method(NamedTuple):
    head: str  # "linear" (LP), "prototype" (CPL), "prompt" (CoOp TP) or "text-encoder" (Table 4 ablation)
    loss: str  # its row of the loss family: a name in w2s_jax.losses.LOSSES (w2s-tp: extract.losses_torch.LOSSES)
    target: str  # "weak": weak logits on hold_train, model chosen by agreement on hold_val;
    #              "truth": ground truth on hold_train and hold_val (the strong ceiling);
    #              "raven": a convex combination of several weak models, its weights learned with the head;
    #              "average": their uniform average
    refine: str = ""  # "" or a refinement of the weak target (w2s_jax.refine: knn, graph, filter): METHOD@knn
    round: int = 1  # r > 1: trained on the soft labels of round r - 1's kept student (METHOD@round2, w2s_jax.fit)


METHODS = {
    # weak-to-strong on the linear probe (LP)
    "ce+lp": Method("linear", "ce", "weak"),
    "kd+lp": Method("linear", "kd", "weak"),
    "auxconf+lp": Method("linear", "auxconf", "weak"),
    "adaptconf+lp": Method("linear", "adaptconf", "weak"),
    # weak-to-strong on class prototypes
    "ce+proto": Method("prototype", "ce", "weak"),
    "auxconf+proto": Method("prototype", "auxconf", "weak"),
    "adaptconf+proto": Method("prototype", "adaptconf", "weak"),
    "cpl": Method("prototype", "cpl", "weak"),  # = KD on prototypes under Adam (see above)
    # several weak models at once (w2s-fit --weak a,b,...): learned weights (RAVEN-style), or the plain average
    "raven+lp": Method("linear", "kd", "raven"),
    "raven+cpl": Method("prototype", "cpl", "raven"),
    "average+lp": Method("linear", "kd", "average"),
    "average+cpl": Method("prototype", "cpl", "average"),
    # strong ceilings: the same heads trained on ground truth
    "ceiling+lp": Method("linear", "truth", "truth"),
    "ceiling+proto": Method("prototype", "truth", "truth"),
    # textual prompt tuning (CoOp) in PyTorch: w2s-tp
    "ce+tp": Method("prompt", "ce", "weak"),
    "kd+tp": Method("prompt", "kd", "weak"),
    "auxconf+tp": Method("prompt", "auxconf", "weak"),
    "adaptconf+tp": Method("prompt", "adaptconf", "weak"),
    "ceiling+tp": Method("prompt", "truth", "truth"),
    # Table 4 ablation: fine-tune the whole text encoder with the CPL loss, instead of learning C
    "cpl+textenc": Method("text-encoder", "cpl", "weak"),
}


def refined_method(name: str) -> Method | None:
    """``METHOD@REFINEMENT`` (``ce+lp@knn``): the method trained on its weak labels refined on the strong features
    (:mod:`w2s_jax.refine`), registered on first use; None if ``name`` is not one (the base must be a method
    trained on one weak model's labels: a w2s-fit head, or w2s-tp's)."""
    base, sep, kind = name.rpartition("@")
    spec = METHODS.get(base)
    if not sep or kind not in REFINEMENTS or spec is None or spec.target != "weak" or spec.refine \
            or spec.head not in (*HEADS, *TORCH_HEADS):
        return None
    return METHODS.setdefault(name, spec._replace(refine=kind))


ROUND = re.compile(r"^(?P<base>.+)@round(?P<round>[1-9][0-9]*)$")


def round_of(name: str) -> tuple[str, int]:
    """``(the round-1 method, round)``: ``("ce+lp@knn", 3)`` for ``ce+lp@knn@round3``, ``(name, 1)`` otherwise."""
    match = ROUND.match(name)
    return (match["base"], int(match["round"])) if match else (name, 1)


def previous_round(name: str) -> str:
    """Whose kept student a round trains on: ``ce+lp`` for ``ce+lp@round2``, ``ce+lp@round2`` for ``@round3``."""
    base, r = round_of(name)
    return base if r <= 2 else f"{base}@round{r - 1}"


def round_method(name: str) -> Method | None:
    """``METHOD@roundR`` (R >= 2): METHOD retrained on the soft labels of round R - 1's kept student, registered on
    first use; None if ``name`` is not one (the base must be a w2s-fit method trained on one weak model's labels,
    refined or not: a ceiling has no teacher to improve on, a multi-weak teacher is learned, TP is w2s-tp's)."""
    base, r = round_of(name)
    spec = METHODS.get(base) or refined_method(base)
    if r < 2 or spec is None or spec.target != "weak" or spec.round != 1 or spec.head not in HEADS:
        return None
    return METHODS.setdefault(name, spec._replace(round=r))


def with_rounds(methods, rounds: int) -> tuple:
    """``methods`` then ``METHOD@round2 … @roundN`` for each of them that can have rounds (``w2s-fit --rounds N``,
    ``[fit] rounds``); rounds = 1 adds nothing."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds = {rounds!r}: use a whole number >= 1 (1: the fit as it is; 2: one more round of "
                         "each W2S method on its own kept student's soft labels)")
    later = [f"{m}@round{r}" for m in methods for r in range(2, rounds + 1) if round_method(f"{m}@round{r}")]
    return tuple(dict.fromkeys([*methods, *later]))


def check_rounds(names) -> None:
    """Each ``METHOD@roundR`` needs the round it trains on among ``names``: a ValueError names the missing one."""
    for name in names:
        if round_of(name)[1] > 1 and previous_round(name) not in names:
            raise ValueError(f"{name} trains on the kept student of {previous_round(name)}; add it to the methods "
                             f"(w2s-fit --rounds N adds every round of each method)")


def register_refinements(names) -> None:
    """Register every refinement of each method of ``names`` that has them (listed by --list-methods)."""
    for name in list(names):
        for kind in REFINEMENTS:
            refined_method(f"{name}@{kind}")


register_refinements(METHODS)
BUILTIN = frozenset(METHODS)  # the registry as shipped: never recorded as a user definition
CEILING_OF_HEAD = {"linear": "ceiling+lp", "prototype": "ceiling+proto", "prompt": "ceiling+tp"}
# "text-encoder" (cpl+textenc) has no ceiling of its own, so no PGR
TORCH_METHODS = tuple(m for m, spec in METHODS.items() if spec.head in TORCH_HEADS and not spec.refine)


def coeffs_of(method: Method) -> Coeffs:
    """The method's row of the loss family; a ValueError if it does not fit the target (a ceiling's row must be
    ground truth alone, ``loss="truth"``; a weak-to-strong row must have no ground truth in it)."""
    if method.loss not in LOSSES:
        raise ValueError(f"{method}: unknown loss {method.loss!r}; valid: {', '.join(LOSSES)}")
    row = LOSSES[method.loss]
    if (method.target == "truth") != (row.truth == 1.0):
        fix = 'loss="truth"' if method.target == "truth" else "a row without ground truth"
        raise ValueError(f"{method}: a method trained on {method.target} needs {fix}; loss {method.loss!r} "
                         f"is {row}")
    return row


RESERVED_ROWS = ("weak", "zero-shot", "oracle")  # the tables' own row labels
RESERVED_PREFIXES = ("best ceiling", "mean regret", "Δ")
MAX_NAME = 100  # a method's name becomes a file name under heads/


def check_method_name(name) -> None:
    """A ValueError unless ``name`` can name a user method everywhere it goes: a table row (not one of the tables'
    own labels, no '|' or line break), a file name (at most 100 characters, printable) and a method list (no
    ',', no '@', which names a refinement)."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"method name {name!r}: use a non-empty name without surrounding spaces")
    bad = [c for c in name if c in "/\\,@|" or not c.isprintable()]
    if bad:
        raise ValueError(f"method name {name!r}: {bad[0]!r} is not allowed; use a plain name without '/', '\\', ',', "
                         "'@' (METHOD@KIND names a refinement), '|' (a table's column separator) or control characters")
    if len(name) > MAX_NAME:
        raise ValueError(f"method name {name[:20]!r}...: {len(name)} characters; use at most {MAX_NAME} (it names "
                         "the method's saved heads file)")
    if name.lower() in RESERVED_ROWS or name.lower().startswith(tuple(p.lower() for p in RESERVED_PREFIXES)):
        raise ValueError(f"method name {name!r} is a row label of the tables (weak, zero-shot, oracle, best "
                         "ceiling..., mean regret..., Δ...); choose another name")


def define_method(name: str, head: str, **coeffs) -> Method:
    """Register a method that is a row of the loss family, no code: ``define_method("half+lp", "linear",
    weak_soft=0.5, weak_hard=0.5)``. ``coeffs`` are :class:`w2s_jax.losses.Coeffs` fields; the row is stored in
    ``LOSSES`` under the method's name. Defining the same method again (a plugin imported twice) changes nothing.
    A ValueError names the problem: a name taken by a built-in or another definition, an unknown head or field,
    a negative weight, weights that do not sum to 1. Returns the registered :class:`Method`."""
    check_method_name(name)
    if head not in HEADS and head != "prompt":
        raise ValueError(f"method {name}: unknown head {head!r}; valid: {', '.join(HEADS)}, prompt (w2s-tp) (a head "
                         "of your own: register it first, README: Add a head)")
    unknown = sorted(set(coeffs) - set(Coeffs._fields))
    if unknown:
        raise ValueError(f"method {name}: unknown field(s) {unknown}; valid: head, {', '.join(Coeffs._fields)}")
    row = check_coeffs(name, Coeffs(**coeffs))
    method = Method(head, name, "truth" if row.truth == 1.0 else "weak")
    if name in METHODS or name in LOSSES:
        if METHODS.get(name) == method and LOSSES.get(name) == row:
            return method
        user_defined = name in METHODS and METHODS[name].loss == name
        taken = (f"defined as head={METHODS[name].head}, {LOSSES[name]}" if user_defined
                 else "a built-in method or loss row")
        raise ValueError(f"method {name}: the name exists already ({taken}); choose another")
    LOSSES[name] = row
    METHODS[name] = method
    register_refinements([name])
    return method


def definitions(names) -> tuple:
    """``((name, head, ((field, value), ...)), ...)``: the user-defined methods among ``names`` (those whose row is
    their own), as saved in a results folder (``FitConfig.defined``) so that the folder alone rebuilds them."""
    bases = dict.fromkeys(n.split("@")[0] for n in names)  # a user's name has no '@': METHOD@KIND@roundR
    return tuple((n, METHODS[n].head, tuple(LOSSES[n]._asdict().items())) for n in bases
                 if n in METHODS and METHODS[n].loss == n and n not in BUILTIN)


def restore_methods(saved) -> None:
    """Register saved :func:`definitions` (``(name, head, fields)`` triples); see :func:`define_method`."""
    for name, head, fields in saved:
        define_method(name, head, **dict(fields))


def restore_names(names) -> None:
    """Register the ``METHOD@REFINEMENT`` and ``METHOD@roundR`` names among ``names`` (read from a results folder)."""
    for name in names:
        refined_method(name) or round_method(name)


def jax_methods(multi_weak: bool = False) -> tuple[str, ...]:
    """The methods w2s-fit runs, in registry order: every method whose head is in ``heads.HEADS``, including
    heads and methods a user registered after import (README: "Add a head"); the multi-weak ones only if asked."""
    return tuple(m for m, spec in METHODS.items()
                 if spec.head in HEADS and (multi_weak or spec.target not in MULTI_WEAK) and not spec.refine
                 and spec.round == 1)


def tp_methods(refined: bool = True) -> tuple[str, ...]:
    """What w2s-tp runs, in registry order: every method with a prompt or text-encoder head (the built-in ones,
    ``TORCH_METHODS``, and any a user defined), and, if ``refined``, their refinements."""
    names = tuple(m for m, spec in METHODS.items() if spec.head in TORCH_HEADS and not spec.refine)
    return names + (refinement_methods(names) if refined else ())


def refinement_methods(names=None) -> tuple[str, ...]:
    """Every ``METHOD@REFINEMENT`` of ``names`` (default: of every w2s-fit method), registered if needed."""
    bases = jax_methods() if names is None else names
    return tuple(f"{m}@{kind}" for m in bases for kind in REFINEMENTS if refined_method(f"{m}@{kind}"))


def check_methods(names, valid=None, command="w2s-fit") -> tuple[str, ...]:
    """``names`` as a tuple, or a ValueError naming the unknown ones and the valid ones (default: w2s-fit's)."""
    for name in names:
        refined_method(name) or round_method(name)
    rounds = tuple(n for n in names if n in METHODS and METHODS[n].round > 1)
    valid = jax_methods(multi_weak=True) + refinement_methods() + rounds if valid is None else valid
    wrong_side = [n for n in names if n in METHODS and n not in valid]
    if wrong_side:
        other = "w2s-tp (PyTorch)" if METHODS[wrong_side[0]].head in TORCH_HEADS else "w2s-fit (JAX)"
        raise ValueError(f"method(s) {wrong_side} are not run by {command}; use {other}")
    unknown = [n for n in names if n not in METHODS]
    not_refined = [n for n in unknown if n.rpartition("@")[0] in METHODS and n.rpartition("@")[2] in REFINEMENTS]
    if not_refined:
        raise ValueError(f"{not_refined[0]}: the ceilings and the multi-weak methods are not refined (a ceiling trains "
                         "on ground truth; a multi-weak teacher is learned); refine a method trained on one weak "
                         "model's labels, e.g. kd+lp@knn")
    no_rounds = [n for n in unknown if round_of(n)[1] > 1 or n.endswith("@round1")]
    if no_rounds:
        raise ValueError(f"{no_rounds[0]}: METHOD@roundR (R >= 2) retrains a w2s-fit method trained on one weak model's "
                         "labels (refined or not) on its previous round's kept student; ceilings, multi-weak and "
                         "w2s-tp methods have no rounds, and round 1 is METHOD itself")
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(valid)} (see {command} --list-methods)")
    check_rounds(names)
    return tuple(names)


def with_refinements(methods, kinds) -> tuple:
    """``methods`` then ``METHOD@KIND`` for each of them that can be refined and each of ``kinds``
    (``w2s-fit --refine knn,graph``, ``[fit] refine``); a ValueError names an unknown kind."""
    unknown = [k for k in kinds if k not in REFINEMENTS]
    if unknown:
        raise ValueError(f"refine: unknown refinement(s) {unknown}; valid: {', '.join(REFINEMENTS)}")
    refined = [f"{m}@{k}" for m in methods for k in kinds if refined_method(f"{m}@{k}")]
    return tuple(dict.fromkeys([*methods, *refined]))


IMPORTED: set = set()  # the plugin names import_plugins has imported in this process (tests forget them again)


def plugin_name(name: str) -> str:
    """How an --import is recognised across commands: a .py file by its stem, a module by its dotted name."""
    return Path(name).stem if name.endswith(".py") else name


def import_plugins(names, allow_replace: bool = False) -> None:
    """Import each module so that the heads and methods it registers exist (``--import``): a dotted module name
    importable from the current folder, or the path of a ``.py`` file. A ValueError names the module if it cannot
    be imported, raises on import, or replaces a head, method or loss row registered before it (unless
    ``allow_replace``: ``--allow-replace``); nothing it replaced stays replaced then."""
    registries = {"head": HEADS, "method": METHODS, "loss row": LOSSES, "ceiling of head": CEILING_OF_HEAD}
    for name in names:
        before = {kind: dict(reg) for kind, reg in registries.items()}
        path = Path(name)
        if path.suffix == ".py" and not path.is_file():
            raise ValueError(f"--import {name}: no such file")
        try:
            if path.suffix == ".py":
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                if str(Path.cwd()) not in sys.path:
                    sys.path.insert(0, str(Path.cwd()))
                importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"--import {name}: {err}; give a module importable from {Path.cwd()} or a .py file") \
                from None
        except ValueError as err:
            raise ValueError(f"--import {name}: {err}") from None
        except (Exception, SystemExit) as err:  # the plugin's own bug or exit: name it, never a bare traceback
            raise ValueError(f"--import {name}: importing it raised {type(err).__name__}: {err}; fix the module") \
                from None
        IMPORTED.add(plugin_name(name))
        replaced = [f"{kind} {key!r}" for kind, reg in registries.items() for key, old in before[kind].items()
                    if reg.get(key) is not old]
        if replaced and not allow_replace:
            for kind, reg in registries.items():
                reg.clear()
                reg.update(before[kind])
            raise ValueError(f"--import {name} replaces the registered {', '.join(replaced)}; register yours under "
                             "another name, or pass --allow-replace to replace it on purpose")
