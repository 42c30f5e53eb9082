"""``w2s-run EXPERIMENT.toml``: extract missing stores, fit everything not yet done, write the report.

An experiment file describes datasets and domains, the strong encoder, weak models, methods,
hyperparameter grids and seeds once. Work is keyed by a hash of its config and of the store it
reads; a results folder appears (by rename) only when complete, so a rerun after a crash or an
edit does only the missing work. See ``experiments/demo.toml`` and ``experiments/domainnet.toml``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import click

from extract import pipeline, weak as weaklib
from extract.datasets import DatasetError, load_dataset
from w2s_jax.config import FitConfig, Hparams
from w2s_jax.methods import JAX_METHODS, TORCH_METHODS, check_methods

SECTIONS = {
    "": {"name", "out", "strong", "data", "fit", "tp", "extract", "report"},
    "data": {"dataset", "domains", "root", "weak", "limit"},
    "fit": {"methods", "seeds", "epochs", "batch_size", "warmup", "hparams", "grid"},
    "tp": {"methods", "seeds", "epochs", "batch_size", "optimizer", "n_ctx", "ctx_init", "hparams"},
    "extract": {"batch_size", "num_workers", "device", "on_corrupt", "weak_epochs", "feature_dtype", "templates"},
    "report": {"curves", "paper"},
}


class ExperimentError(ValueError):
    """A bad experiment file, naming the file, the problem and the fix."""


def _check_keys(path, section: str, table: dict) -> None:
    unknown = sorted(set(table) - SECTIONS[section])
    if unknown:
        where = f"[{section}]" if section else "the top level"
        raise ExperimentError(f"{path}: unknown key(s) {unknown} in {where}; valid: {', '.join(sorted(SECTIONS[section]))}")


def load_experiment(path) -> dict:
    """Parse and validate an experiment file; datasets are opened so a bad root fails before any work."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} not found")
    try:
        exp = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"{path}: not valid TOML ({err})") from None
    _check_keys(path, "", exp)
    for section in ("fit", "tp", "extract", "report"):
        _check_keys(path, section, exp.get(section, {}))
    for key in ("hparams", "grid"):
        for section in ("fit", "tp"):
            bad = sorted(set(exp.get(section, {}).get(key, {})) - set(Hparams._fields))
            if bad:
                raise ExperimentError(f"{path}: unknown hyperparameter(s) {bad} in [{section}.{key}]; "
                                      f"valid: {', '.join(Hparams._fields)}")
    if not exp.get("data"):
        raise ExperimentError(f"{path}: no [[data]] tables; add one with dataset, domains and weak")
    try:
        for block in exp["data"]:
            _check_keys(path, "data", block)
            for domain in block.get("domains", [None]):
                load_dataset(block["dataset"], domain=domain, root=block.get("root"))
            for w in block.get("weak", []):
                weaklib.parse_weak(w)
        methods = exp.get("fit", {}).get("methods", ["all"])
        check_methods(JAX_METHODS if methods == ["all"] else methods)
        if "tp" in exp:
            check_methods(exp["tp"].get("methods", TORCH_METHODS), valid=TORCH_METHODS, command="w2s-tp")
    except (DatasetError, weaklib.WeakModelError, ValueError, KeyError) as err:
        raise ExperimentError(f"{path}: {err}") from None
    exp.setdefault("out", f"experiments-out/{path.stem}")
    return exp


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9@.-]+", "-", Path(spec).name if "/" in spec else spec)[:40]


def _once(folder: Path, work, log) -> bool:
    """Run ``work(tmp)`` unless ``folder`` is complete; the folder appears only when work finishes."""
    if (folder / "metrics.json").exists():
        log(f"done already: {folder}")
        return False
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    work(tmp)
    os.replace(tmp, folder)
    log(f"finished: {folder}")
    return True


def run_experiment(exp: dict, *, log=print) -> Path:
    """Run everything ``exp`` asks for that is not done yet; returns the report folder."""
    from w2s_jax.report import to_markdown, write_report
    from w2s_jax.run import run
    from w2s_jax.store import read_store

    out = Path(exp["out"])
    strong = exp.get("strong", "efficientnet-lite0")
    ex = exp.get("extract", {})
    opts = pipeline.Options(**{k: v for k, v in ex.items() if k != "templates"}, log=log)
    fit, tp = exp.get("fit", {}), exp.get("tp")
    for block in exp["data"]:
        for domain in block.get("domains", [None]):
            dataset = load_dataset(block["dataset"], domain=domain, root=block.get("root")).limited(block.get("limit"))
            store_path = out / "stores" / f"{dataset.name}-{dataset.domain}-{_slug(strong)}.h5"
            templates = tuple(ex.get("templates", pipeline.encoders.DEFAULT_TEMPLATES))
            pipeline.extract(dataset, strong, block.get("weak", ["pixels"]), store_path, opts, templates)
            store = read_store(store_path)
            store_id = _key([dataclasses.asdict(store.provenance), store.weak_info])
            for weak in [weaklib.parse_weak(w).name for w in block.get("weak", ["pixels"])]:
                where = out / "results" / f"{dataset.name}-{dataset.domain}" / weak
                methods = fit.get("methods", ["all"])
                cfg = FitConfig(store=str(store_path), weak=weak,
                                methods=JAX_METHODS if methods == ["all"] else tuple(methods),
                                seeds=fit.get("seeds", 5), epochs=fit.get("epochs", 10),
                                batch_size=fit.get("batch_size", 512), warmup=fit.get("warmup", 0.1),
                                hparams=Hparams(**fit.get("hparams", {})),
                                grid=tuple((k, tuple(v)) for k, v in fit.get("grid", {}).items()))
                _once(where / f"fit-{_key([cfg.to_dict(), store_id])}", lambda tmp: run(cfg, tmp), log)
                if tp is not None and store.text_TxKxD is not None:
                    _run_tp(tp, store_path, strong, weak, store_id, where, opts.device, log)
    report = out / "report"
    rep = exp.get("report", {})
    tables, _ = write_report([out / "results"], report, curves=tuple(rep.get("curves", ("cpl", "kd+lp", "kd+tp"))),
                             paper=rep.get("paper", False))
    for table in tables:
        log(to_markdown(table) + "\n")
    return report


def _run_tp(tp: dict, store_path, strong, weak, store_id, where: Path, device, log) -> None:
    from extract.prompt import TPConfig
    from extract.tp_cli import run_tp

    cfg = TPConfig(store=str(store_path), strong=strong, weak=weak,
                   methods=tuple(tp.get("methods", TORCH_METHODS)), seeds=tp.get("seeds", 5),
                   epochs=tp.get("epochs", 10), batch_size=tp.get("batch_size", 512),
                   optimizer=tp.get("optimizer", "adam"), n_ctx=tp.get("n_ctx", 16), ctx_init=tp.get("ctx_init", ""),
                   hparams=Hparams(**tp.get("hparams", {})), device=device)
    _once(where / f"tp-{_key([cfg.to_dict(), store_id])}", lambda tmp: run_tp(cfg, tmp), log)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("experiment", type=click.Path())
def main(experiment):
    """Run an experiment file: extract missing stores, fit what is not done, write the report."""
    from extract.cli import USER_ERRORS

    try:
        report = run_experiment(load_experiment(experiment), log=click.echo)
    except (ExperimentError, *USER_ERRORS) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"report in {report}")


if __name__ == "__main__":
    main()
