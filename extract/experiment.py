"""``w2s-run EXPERIMENT.toml``: extract missing stores, fit everything not yet done, write the report.

An experiment file describes datasets and domains, the strong encoder, weak models, methods,
hyperparameter grids and seeds once. Work is keyed by a hash of its config and of the store it
reads; a results folder appears (by rename) only when complete, so a rerun after a crash or an
edit does only the missing work. See ``experiments/demo.toml`` and ``experiments/domainnet.toml``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from pathlib import Path

import click

from extract import pipeline, weak as weaklib
from extract import named
from extract.cli import default_domainnet_root
from extract.datasets import DATA_ENV, DatasetError, default_data_root, load_dataset
from extract.schema import check_types
from w2s_jax.config import FitConfig, Hparams, check_number
from w2s_jax.methods import (METHODS, MULTI_WEAK, TORCH_METHODS, check_methods, definitions, jax_methods,
                             restore_methods, tp_methods, with_refinements, with_rounds)


class ExperimentError(ValueError):
    """A bad experiment file, naming the file, the problem and the fix."""


def load_experiment(path) -> dict:
    """Parse and validate an experiment file; datasets are opened so a bad root fails before any work."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} not found")
    try:
        exp = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"{path}: not valid TOML ({err})") from None
    if not exp.get("data"):
        raise ExperimentError(f"{path}: no [[data]] tables; add one with dataset, domains and weak")
    try:
        check_types(exp)  # unknown keys and types, one pydantic model per section (extract.schema)
    except ValueError as err:
        raise ExperimentError(f"{path}: {err}") from None
    for key in ("hparams", "grid"):
        for section in ("fit", "tp"):
            bad = sorted(set(exp.get(section, {}).get(key, {})) - set(Hparams._fields))
            if bad:
                raise ExperimentError(f"{path}: unknown hyperparameter(s) {bad} in [{section}.{key}]; "
                                      f"valid: {', '.join(Hparams._fields)}")
    try:
        define_methods(exp.get("methods", {}))
        for block in exp["data"]:
            for domain in block.get("domains", [None]):
                if domain is not None:
                    _check_path_name(domain)
                root = data_root(block)
                if named.is_named(block["dataset"]):
                    _check_named(block, domain, root)
                    continue
                if root is not None and not Path(root).is_dir():
                    given = "root in [[data]]" if block.get("root") else f"the default, ${DATA_ENV}/domainnet"
                    raise ValueError(f"dataset root {root} does not exist ({given}); fetch the data there with "
                                     f"`w2s-extract download --domain {domain} --root {root}`, or point root (or "
                                     f"${DATA_ENV}, now {os.environ.get(DATA_ENV, 'unset: ./data')}) at it")
                load_dataset(block["dataset"], domain=domain, root=root)
            for w in weaklib.expand_weak(block.get("weak", [])):
                _check_path_name(weaklib.parse_weak(w).name)
        fit_config(exp.get("fit", {}), "unused", "unused")  # every [fit] value in range, before any work
        if exp.get("fit", {}).get("multi_weak"):
            fit_config(exp["fit"], "unused", "a", ensemble=("a", "b"))
        _check_extract(exp.get("extract", {}))
        if "tp" in exp:
            tp_config(exp["tp"], "unused", "unused", "unused", "cpu")  # every [tp] value in range, before any work
            fit_seeds, tp_seeds = exp.get("fit", {}).get("seeds", 5), exp["tp"].get("seeds")
            if tp_seeds is not None and tp_seeds != fit_seeds:
                raise ValueError(f"[tp] seeds = {tp_seeds} and [fit] seeds = {fit_seeds}: the report pairs TP rows "
                                 "with the fit's seed by seed; give both the same number (or leave [tp] seeds out: it "
                                 "follows [fit])")
            exp["tp"].setdefault("seeds", fit_seeds)
    except (DatasetError, weaklib.WeakModelError, ValueError, KeyError, TypeError) as err:
        raise ExperimentError(f"{path}: {err}") from None
    exp.setdefault("out", f"experiments-out/{path.stem}")
    return exp


def define_methods(tables: dict) -> None:
    """Register the file's ``[methods.NAME]`` tables: each a head and a row of the loss family
    (``w2s_jax.losses.Coeffs`` fields), e.g. ``[methods.half+lp]`` ``head = "linear"``, ``weak_soft = 0.5``,
    ``weak_hard = 0.5``. A ValueError names the method and the field."""
    if not isinstance(tables, dict):
        raise ValueError("[methods] holds one table per method: [methods.NAME] with head = ... and the loss "
                         "family's weights")
    for name, table in tables.items():
        if not isinstance(table, dict) or "head" not in table:
            raise ValueError(f"[methods.{name}] needs head = \"linear\", \"prototype\", \"prompt\" (or a head you "
                             "registered) and the loss family's weights, e.g. weak_soft = 0.5, weak_hard = 0.5")
        fields = {k: v for k, v in table.items() if k != "head"}
        restore_methods([(name, table["head"], fields)])


def data_root(block: dict):
    """A [[data]] block's root: as given, else for DomainNet the CLI's default (``$W2S_DATA/domainnet``, ``W2S_DATA``
    defaulting to ./data), where ``w2s-extract --domain`` downloads, and for a dataset by name the data folder
    (``$W2S_DATA``) that holds NAME/; None for the demo."""
    if block.get("root"):
        return block["root"]
    if named.is_named(block.get("dataset", "")):
        return str(default_data_root())
    return str(default_domainnet_root()) if block.get("dataset") == "domainnet" else None


def _check_named(block: dict, domain, root) -> None:
    """A dataset by name is opened now, so that a bad one fails before any work, unless the run will download it."""
    try:
        load_dataset(block["dataset"], domain=domain, root=root)
    except DatasetError:
        if not (block.get("download", True) and named.NAMED[domain or block["dataset"]].download_gb):
            raise


def _check_path_name(name) -> None:
    """Names that become folder names: no path separators, no '..', nothing empty."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise ValueError(f"{name!r} becomes part of a path under out; use a plain name (no '/', '\\' or '..')")


def fit_config(fit: dict, store, weak, ensemble=()) -> FitConfig:
    """The FitConfig of one (store, weak model) from the [fit] table; raises ValueError for a bad value. With an
    ``ensemble`` (several weak models, ``weak`` first), the methods are [fit]'s ``multi_weak`` list."""
    methods = fit.get("multi_weak", []) if ensemble else fit.get("methods", ["all"])
    if ensemble:
        methods = [m for m in jax_methods(multi_weak=True) if METHODS[m].target in MULTI_WEAK] \
            if methods == ["all"] else methods
        wrong = [m for m in methods if m in METHODS and METHODS[m].target not in MULTI_WEAK]
        if wrong:
            raise ValueError(f"[fit] multi_weak lists {wrong}, which learn from one weak model; put them in methods")
    else:  # "all" is every built-in and defined method; names beside it are added (e.g. ce+lp@knn)
        methods = [*jax_methods(), *(m for m in methods if m != "all")] if "all" in methods else methods
        methods = with_rounds(with_refinements(check_methods(methods), fit.get("refine", [])), fit.get("rounds", 1))
    return FitConfig(store=str(store), weak=weak, ensemble=tuple(ensemble), methods=check_methods(methods),
                     defined=definitions(methods),  # in the folder's key: editing a [methods.X] fits it again
                     seeds=fit.get("seeds", 5), epochs=fit.get("epochs", 10), batch_size=fit.get("batch_size", "auto"),
                     warmup=fit.get("warmup", 0.1), hparams=Hparams(**fit.get("hparams", {})),
                     seed_axis=fit.get("seed_axis", "auto"), select=fit.get("select", "agreement"),
                     bucket=fit.get("bucket", True),
                     grid=tuple((k, tuple(v)) for k, v in fit.get("grid", {}).items()))


def _check_extract(ex: dict) -> None:
    choices = {"feature_dtype": ("float32", "float16"), "on_corrupt": pipeline.ON_CORRUPT}
    for key, valid in choices.items():
        if key in ex and ex[key] not in valid:
            raise ValueError(f"[extract] {key} = {ex[key]!r}; valid: {', '.join(valid)}")
    for key, low in (("batch_size", 1), ("num_workers", 0), ("weak_epochs", 1)):
        if key in ex:
            check_number(f"[extract] {key}", ex[key], low, math.inf, integer=True)
    if "device" in ex and not isinstance(ex["device"], str):
        raise ValueError(f"[extract] device = {ex['device']!r}; valid: a torch device name such as 'cpu' or 'cuda'")
    if "device" in ex:
        from extract.cli import resolve_device

        resolve_device(ex["device"])  # a CUDA device on a machine without one is refused before any work


def tp_config(tp: dict, store, strong: str, weak: str, device: str):
    """The TPConfig of one (store, weak model) from the [tp] table; raises ValueError for a bad value. ``methods``
    "all" is every method with a prompt or text-encoder head, the defined ones included."""
    from extract.prompt import TPConfig, default_precision

    methods = tp.get("methods", list(TORCH_METHODS))
    methods = [*tp_methods(refined=False), *(m for m in methods if m != "all")] if "all" in methods else methods
    methods = with_refinements(check_methods(methods, valid=tp_methods(), command="w2s-tp"), tp.get("refine", []))
    return TPConfig(store=str(store), strong=strong, weak=weak, methods=methods, defined=definitions(methods),
                    seeds=tp.get("seeds", 5), epochs=tp.get("epochs", 10), batch_size=tp.get("batch_size", 512),
                    optimizer=tp.get("optimizer", "adam"), n_ctx=tp.get("n_ctx", 16), ctx_init=tp.get("ctx_init", ""),
                    hparams=Hparams(**tp.get("hparams", {})), device=device,
                    precision=tp.get("precision", default_precision(device)), select=tp.get("select", "agreement"),
                    prefix=tp.get("prefix", "shared"),
                    grid=tuple((k, tuple(v)) for k, v in tp.get("grid", {}).items()))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9@.-]+", "-", Path(spec).name if "/" in spec else spec)[:40]


def complete(folder: Path) -> bool:
    """Whether a results folder is complete (they appear whole, w2s_jax.outputs), its heads saved with it."""
    return (folder / "metrics.json").exists() and (folder / "heads" / "heads.json").exists()


def _done(folder: Path, log) -> bool:
    """:func:`complete`, said in the log."""
    if complete(folder):
        log(f"done already: {folder}")
        return True
    if (folder / "metrics.json").exists():
        log(f"{folder} was written before heads were saved with each fit: fitting it again")
    return False


def run_experiment(exp: dict, *, log=print, verbose: bool = False) -> Path:
    """Run everything ``exp`` asks for that is not done yet, unit by unit (:mod:`extract.grid`); returns the report
    folder. At the end it prints one screen: the headline table (the first weak model's Table 2 analogue, with PGR)
    and where the full report is; ``verbose``: every table of the report."""
    from extract.grid import Grid

    return Grid(exp, log).run_all(verbose)


def weak_across_domains(made: list, folder: Path, opts, log, strong: str | None = None, targets=None) -> None:
    """Each weak model of each domain applied to every other domain's test images (``extract.cross_weak``), for PGR
    across domains, every fine-tuned one of the other domains in one image pass per target (``targets``: the
    indices into ``made`` of the targets to do; all by default); a fine-tuned one whose weights were not kept (a
    store made before they were) is left out, with a line."""
    from extract.cross_weak import CrossJob, write_cross_weak_all
    from w2s_jax.cross_domain import class_columns
    from w2s_jax.store import read_store

    rows, infos = {}, {}
    for dataset, path, _ in made:
        store = read_store(path)
        rows[path] = {s: (sp.ids_N, sp.labels_N) for s, sp in store.splits.items()}
        infos[path] = store.weak_info
    for t, (target, target_path, _) in enumerate(made):
        if targets is not None and t not in targets:
            continue
        jobs = [CrossJob(source, rows[source_path], spec, source_path, infos[source_path][spec.name], strong)
                for source, source_path, specs in made if source_path != target_path
                and class_columns(source.class_names, target.class_names) is not None  # ImageNet-R of ImageNet
                for spec in map(weaklib.parse_weak, specs) if spec.name in infos[source_path]]
        for job, path in zip(jobs, write_cross_weak_all(jobs, target, rows[target_path]["test"], folder, opts)):
            if path is None:
                log(f"weak model {job.spec.name} of {job.source.domain}: its store {job.source_store} was made "
                    "before fine-tuned weights were kept beside it, so no PGR on "
                    f"{target.domain}; re-extract that store (delete it and rerun) to have them")


def _run_tp(tp: dict, store_path, strong, weaks, store_id, where: Path, device, log) -> list[Path]:
    """The TP folders of a store's weak models (``where/WEAK/tp-KEY``); those not done are fitted in one loop."""
    from extract.tp_cli import run_tp

    configs = {w: tp_config(tp, store_path, strong, w, device) for w in weaks}
    folders = {w: where / w / f"tp-{_key([configs[w].to_dict(), store_id])}" for w in weaks}
    pending = {w: f for w, f in folders.items() if not _done(f, log)}
    if pending:
        log(f"== prompt tuning: weak model(s) {', '.join(pending)}")
        run_tp(configs[next(iter(pending))], pending, log=log)
        for f in pending.values():
            log(f"finished: {f}")
    return list(folders.values())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("experiment", type=click.Path())
@click.option("--compile-cache/--no-compile-cache", default=True, show_default=True,
              help="Keep compiled programs on disk ($W2S_CACHE/jax or ~/.cache/w2s/jax), so that a rerun after an "
                   "edit compiles only the programs whose shapes changed.")
@click.option("--verbose", is_flag=True, help="Print every table of the report, not only the headline one.")
@click.option("--plan", "show_plan", is_flag=True,
              help="Print the units of work, their dependencies, estimated costs and whether they are done; run nothing.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --plan: the devices to estimate the wall time on.")
@click.option("--shard", default=None, metavar="I/N",
              help="Run only shard I of N's units whose inputs exist (scheduler array jobs); then run without --shard "
                   "to finish what is left and write the report.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Run the units as tasks of a Ray cluster: ADDRESS, else $RAY_ADDRESS, else a local one "
                   "(pip install 'w2s[ray]').")
def main(experiment, compile_cache, verbose, show_plan, gpus, shard, ray_address):
    """Run an experiment file: extract missing stores, fit what is not done, write the report."""
    from extract.cli import USER_ERRORS, _parse_shard
    from extract.grid import Grid
    from w2s_jax import compile_cache as cache

    if compile_cache:
        cache.enable(warn=lambda text: click.echo(f"warning: {text}", err=True))
    parsed = _parse_shard(shard)
    if [parsed is not None, ray_address is not None, show_plan].count(True) > 1:
        raise click.UsageError("give one of --plan, --shard and --ray")
    try:
        exp = load_experiment(experiment)
        if show_plan:
            click.echo("\n".join(Grid(exp, click.echo).plan_lines(gpus)))
        elif parsed is not None:
            failed = Grid(exp, click.echo, tp_chunks=parsed[1]).run_shard(*parsed)
            _exit_failed(failed, f"w2s-run {experiment} --shard {shard}")
        elif ray_address is not None:
            from extract.ray_run import run_on_ray

            _exit_failed(run_on_ray(exp, None if ray_address == "auto" else ray_address, log=click.echo,
                                    verbose=verbose, compile_cache=compile_cache), f"w2s-run {experiment} --ray")
        else:
            run_experiment(exp, log=click.echo, verbose=verbose)
    except (ExperimentError, *USER_ERRORS, ValueError) as err:  # ValueError: e.g. folders that define a method apart
        raise click.ClickException(str(err)) from None


def _exit_failed(failed: list, rerun: str) -> None:
    """The last lines of a run with failed units: which, and how to rerun them; exit status 1."""
    if failed:
        raise click.ClickException(f"{len(failed)} unit(s) failed: {', '.join(failed)} (their errors are above). Fix "
                                   f"the cause and run `{rerun}` again: finished units are skipped")


if __name__ == "__main__":
    main()
