"""The typed schema of an experiment file (``w2s-run``): every key's type, checked before any work.

One pydantic model per section, each with ``extra="forbid"``: an unknown key is named with the valid ones, and a
value of the wrong type (a scalar where a list belongs, a string read letter by letter, a word where a number
belongs) is refused naming the key, instead of failing later. Ranges and names are checked by the code that owns
them (``FitConfig``, ``check_methods``, ``load_dataset``).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is named, with the valid ones (check_types)


class Data(_Section):
    dataset: StrictStr
    domains: Optional[list[StrictStr]] = None
    root: Optional[StrictStr] = None
    weak: list[StrictStr] = ["pixels"]
    limit: Optional[StrictInt] = Field(None, ge=1, description="rows per split, a positive whole number")
    download: StrictBool = True  # a dataset by name missing from the data folder is downloaded (when it can be)


class Fit(_Section):
    methods: list[StrictStr] = ["all"]
    multi_weak: list[StrictStr] = []
    seeds: StrictInt = 5
    epochs: StrictInt = 10
    batch_size: Union[StrictInt, Literal["auto"]] = "auto"
    warmup: Number = 0.1
    seed_axis: StrictStr = "auto"
    select: StrictStr = "agreement"
    bucket: StrictBool = True
    refine: list[StrictStr] = []
    rounds: StrictInt = 1
    hparams: dict[str, Number] = {}
    grid: dict[str, list[Number]] = {}


class TP(_Section):
    methods: list[StrictStr] = []
    seeds: StrictInt = 5
    epochs: StrictInt = 10
    batch_size: StrictInt = 512
    optimizer: StrictStr = "adam"
    n_ctx: StrictInt = 16
    ctx_init: StrictStr = ""
    precision: StrictStr = "fp32"
    prefix: StrictStr = "shared"
    select: StrictStr = "agreement"
    refine: list[StrictStr] = []
    hparams: dict[str, Number] = {}
    grid: dict[str, list[Number]] = {}


class Extract(_Section):
    batch_size: StrictInt = 64
    num_workers: StrictInt = 2
    device: StrictStr = "cpu"
    on_corrupt: StrictStr = "skip"
    weak_epochs: StrictInt = 3
    feature_dtype: StrictStr = "float32"
    templates: list[StrictStr] = []


class Report(_Section):
    curves: list[StrictStr] = []
    paper: StrictBool = False
    cross_domain: StrictBool = False


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")  # the loss family's fields: w2s_jax.methods.define_method checks them
    head: StrictStr


class Experiment(_Section):
    name: StrictStr = ""
    out: StrictStr = ""
    strong: StrictStr = "efficientnet-lite0"
    data: list[Data] = Field(min_length=1)
    fit: Fit = Fit()
    tp: Optional[TP] = None
    extract: Extract = Extract()
    report: Report = Report()
    methods: dict[str, Method] = {}


TYPE_WORDS = {"list_type": "a list, e.g. [\"a\", \"b\"]", "string_type": "a string in quotes", "int_type": "a whole number",
              "float_type": "a number", "bool_type": "true or false", "dict_type": "a table", "model_type": "a table",
              "greater_than_equal": "a positive whole number", "literal_error": "'auto'"}


SECTIONS = {"": Experiment, "data": Data, "fit": Fit, "tp": TP, "extract": Extract, "report": Report}


def check_types(exp: dict) -> None:
    """A ValueError naming the unknown keys of a section (with its valid ones), else every key whose value has the
    wrong type, with the expected type."""
    try:
        Experiment.model_validate(exp)
    except pydantic.ValidationError as err:
        unknown = {}  # section -> unknown keys
        for e in err.errors():
            if e["type"] == "extra_forbidden":
                section = next((str(p) for p in e["loc"][:-1] if isinstance(p, str)), "")
                unknown.setdefault(section, []).append(str(e["loc"][-1]))
        if unknown:
            section, keys = next(iter(unknown.items()))
            where = {"": "the top level", "data": "[[data]]"}.get(section, f"[{section}]")
            valid = sorted(SECTIONS[section].model_fields)
            raise ValueError(f"unknown key(s) {sorted(keys)} in {where}; valid: {', '.join(valid)}") from None
        found, expected = {}, {}  # per key: the value given, and every type that would do
        for e in err.errors():
            where = _where(e["loc"])
            if e["type"] == "missing":
                found[where] = None
                continue
            found[where] = e.get("input")
            expected.setdefault(where, []).append(TYPE_WORDS.get(e["type"], e["msg"]))
        problems = [f"{where} is missing" if where not in expected else
                    f"{where} = {found[where]!r} should be {' or '.join(dict.fromkeys(expected[where]))}"
                    for where in found]
        raise ValueError("wrong type(s): " + "; ".join(problems)) from None


def _where(loc) -> str:
    """('fit', 'grid', 'lr') -> "[fit.grid] lr"; ('data', 0, 'domains') -> "[[data]] 1 domains"."""
    parts = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "float", "str")))]
    if not parts:
        return "the file"
    if parts[0] == "data" and len(parts) > 1 and isinstance(parts[1], int):
        return f"[[data]] block {parts[1] + 1}: " + ".".join(map(str, parts[2:]))
    if len(parts) == 1:
        return str(parts[0])
    return f"[{'.'.join(map(str, parts[:-1]))}] {parts[-1]}"
