"""``w2s-fit``: fit every method for every seed (and hparam) on a feature store, print the table."""
from __future__ import annotations

from pathlib import Path

import click

from w2s_jax.config import FitConfig, Hparams
from w2s_jax.losses import LOSSES, Coeffs
from w2s_jax.methods import (METHODS, MULTI_WEAK, check_methods, import_plugins, jax_methods, refinement_methods,
                             with_refinements, with_rounds)
from w2s_jax.refine import REFINEMENTS
from w2s_jax.select import CRITERIA

DEFAULTS = Hparams()


def _parse_batch_size(text: str):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r}: expected 'auto' or a positive integer", param_hint="--batch-size")
    return int(text)


def _parse_grid(items) -> tuple:
    grid = []
    for item in items:
        name, sep, values = item.partition("=")
        try:
            parsed = tuple(float(v) for v in values.split(","))
        except ValueError:
            parsed = None
        if not sep or not parsed or name not in Hparams._fields:
            raise click.BadParameter(
                f"{item!r}: expected FIELD=V1,V2,... with FIELD one of {', '.join(Hparams._fields)}", param_hint="--grid")
        grid.append((name, parsed))
    return tuple(grid)


def row_text(row) -> str:
    """A loss row's fields that differ from the defaults of :class:`w2s_jax.losses.Coeffs`."""
    if row is None:
        return "PyTorch loss of that name"
    return ", ".join(f"{f}={v:g}" for f, v in row._asdict().items() if v != getattr(Coeffs(), f))


TARGET_WORDS = {"raven": "a learned mix of weak models (--weak A,B)", "average": "the average of weak models (--weak A,B)"}
STORES = Path("stores")  # where w2s-extract writes by default


def find_store(folder: Path = STORES) -> str:
    """The only store under ``folder``, announced; several or none is a usage error that says what to do."""
    found = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    if len(found) == 1:
        click.echo(f"using the only store under {folder}/: {found[0]}")
        return str(found[0])
    if found:
        listing = "\n  ".join(map(str, found))
        raise click.UsageError(f"{len(found)} stores under {folder}/; choose one with --store:\n  {listing}")
    raise click.UsageError(f"no --store given and no store under {folder}/. Make one with `w2s-extract --dataset demo` "
                           "(offline demo) or `w2s-extract --domain real` (DomainNet, downloaded when missing)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(), help="Feature store written by w2s-extract. [default: the only one under stores/]")
@click.option("--weak", default=None,
              help="Weak model in the store, or several, A,B,...: every other method is fitted for each of them (one "
                   "folder each, one compiled program) and the multi-weak methods (raven+..., average+...) combine "
                   "them (folder A+B); 'all': every weak model of the store. With several folders, --out is their "
                   "parent, or a pattern holding {weak}. [default: the store's only/first one]")
@click.option("--methods", default="all", show_default=True, help="Comma-separated method names, or 'all'.")
@click.option("--seeds", default=5, show_default=True, help="Number of seeds (0..N-1).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default="auto", show_default=True,
              help="Minibatch size, or 'auto': the paper's 512 unless an epoch would have fewer than 16 steps, "
                   "then halved until it has (recorded in config.json).")
@click.option("--lr", default=DEFAULTS.lr, show_default=True)
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True, help="T of KD / tau of CPL.")
@click.option("--logit-scale", default=DEFAULTS.logit_scale, show_default=True, help="s of the prototype head.")
@click.option("--lp-scale", default=DEFAULTS.lp_scale, show_default=True, help="s of the linear head.")
@click.option("--lp-shrinkage", default=DEFAULTS.lp_shrinkage, show_default=True,
              help="δ of the linear head's start: 1 = nearest class mean, 0 = LDA.")
@click.option("--lp-l2", default=DEFAULTS.lp_l2, show_default=True,
              help="L2 penalty on the linear head's s·W (scikit-learn's 1/(C·n)).")
@click.option("--alpha-max", default=DEFAULTS.alpha_max, show_default=True, help="AuxConf alpha_max.")
@click.option("--tau-a", default=DEFAULTS.tau_a, show_default=True, help="AdaptConf temperature.")
@click.option("--raven-lr", default=DEFAULTS.raven_lr, show_default=True,
              help="Adam lr of the weak models' weights in the raven+... methods.")
@click.option("--refine", default="", metavar="KINDS",
              help=f"Also fit every chosen method on its weak labels refined on the strong features: comma-separated "
                   f"among {', '.join(REFINEMENTS)} (adds METHOD@KIND rows; README: Refine the weak labels).")
@click.option("--refine-k", default=DEFAULTS.refine_k, show_default=True, type=int,
              help="k of the kNN refinements and of --select refined.")
@click.option("--refine-alpha", default=DEFAULTS.refine_alpha, show_default=True, help="α of METHOD@graph.")
@click.option("--refine-c", default=DEFAULTS.refine_c, show_default=True,
              help="Fraction of rows METHOD@filter drops.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Strong-to-strong rounds: 2 or more also fits METHOD@round2 … @roundN for every chosen W2S method, "
                   "each trained on its previous round's kept student's soft labels (README: Rounds).")
@click.option("--select", type=click.Choice(CRITERIA), default="agreement", show_default=True,
              help="The label-free rule on hold_val that keeps each model's epoch and each method's grid point "
                   "(README: Choosing without labels); the report shows every rule's regret.")
@click.option("--grid", multiple=True, help="Sweep a hyperparameter: FIELD=V1,V2 (repeatable; cartesian product).")
@click.option("--vmap/--no-vmap", default=True, show_default=True, help="One compiled call for the grid, or one per model.")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="Compute all linear heads of a seed in one wide GEMM per step, or model by model (same numbers).")
@click.option("--matmul-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Inputs of the fused GEMM; bfloat16 accumulates in float32 (pays on GPUs with bf16 units, not on CPU).")
@click.option("--seed-axis", type=click.Choice(["auto", "map", "vmap"]), default="auto", show_default=True,
              help="A device's seeds one after the other (map) or batched (vmap); auto: vmap on a GPU/TPU, map on "
                   "the CPU, where each is faster (same numbers).")
@click.option("--bucket/--no-bucket", default=True, show_default=True,
              help="Pad the store's rows to a size bucket (at most 25% more), so that stores of one bucket run one "
                   "compiled program, loaded from the compilation cache after the first (same numbers; README: "
                   "Size buckets).")
@click.option("--compile-cache/--no-compile-cache", default=True, show_default=True,
              help="Keep compiled programs on disk ($W2S_CACHE/jax or ~/.cache/w2s/jax): a rerun of the same grid "
                   "does not compile again.")
@click.option("--out", type=click.Path(), default=None, help="Results folder. [default: results/STORE-WEAK]")
@click.option("--overwrite", is_flag=True, help="Replace a results folder that holds another config.")
@click.option("--distributed", is_flag=True,
              help="Multi-host: call jax.distributed.initialize() first (SLURM is auto-detected; see README).")
@click.option("--coordinator", default=None, help="With --distributed off SLURM: host:port of process 0.")
@click.option("--num-processes", type=int, default=None, help="With --distributed off SLURM: number of processes.")
@click.option("--process-id", type=int, default=None, help="With --distributed off SLURM: this process's id.")
@click.option("--import", "plugins", multiple=True, metavar="MODULE",
              help="Import a module (name or .py file) that registers your own heads and methods (README: Add a head).")
@click.option("--allow-replace", is_flag=True,
              help="Let an --import module replace a head, method or loss row registered before it (refused otherwise).")
@click.option("--list-methods", is_flag=True, help="List the methods and exit.")
@click.option("--show", type=click.Path(), multiple=True,
              help="Print the table of existing results folder(s) and exit; several are merged into one table.")
def main(store, weak, methods, seeds, epochs, batch_size, lr, temperature, logit_scale, lp_scale, lp_shrinkage,
         lp_l2, alpha_max, tau_a, raven_lr, refine, refine_k, refine_alpha, refine_c, rounds, select,
         grid,
         vmap, fuse, matmul_dtype, seed_axis, bucket, compile_cache, out, overwrite, distributed, coordinator, num_processes, process_id, plugins, allow_replace, list_methods, show):
    """Fit CPL and linear-probe heads with CE, KD, AuxConf, AdaptConf (+ ceilings) for every seed."""
    from w2s_jax import results

    try:
        import_plugins(plugins, allow_replace)
    except ValueError as err:
        raise click.ClickException(str(err)) from None

    if list_methods:
        for name, m in METHODS.items():
            if m.round > 1:  # registered by an earlier use in this process; listed generically below
                continue
            where = "" if name in jax_methods(multi_weak=True) + refinement_methods() else "  (PyTorch: w2s-tp)"
            target = TARGET_WORDS.get(m.target, m.target) + (f" refined by {m.refine}" if m.refine else "")
            click.echo(f"{name:22s} head={m.head:12s} loss={m.loss:9s} trained on "
                       f"{target:8s} [{row_text(LOSSES.get(m.loss))}]{where}")
        click.echo("\nMETHOD@knn, @graph and @filter train METHOD on its weak labels refined on the strong features "
                   "(w2s-fit --refine knn,graph,filter adds them to the chosen methods).\n"
                   "METHOD@round2, @round3, ... train METHOD (any W2S method above, refined or not) on the soft labels "
                   "of its previous round's kept student (w2s-fit --rounds N adds them).")
        click.echo("\nA method is a head plus a row of the loss family [its nonzero coefficients]; add your own with "
                   "[methods.NAME] in an experiment file or w2s_jax.define_method (README: Define a method).\n"
                   "cpl is the paper's KL loss on text-initialised prototypes; under Adam it equals KD on that head "
                   "(the T² factor cancels), so kd+proto and cpl+lp (= kd+lp) are not registered.")
        return
    if show:
        if select != "agreement":
            click.echo(f"note: --select {select} is ignored with --show: each folder keeps the rule it was fit with; "
                       "its regret table shows what every rule would keep", err=True)
        try:
            results.check_mergeable(show)
            click.echo(results.all_tables(results.merge([results.load_summary(d) for d in show])))
        except (FileNotFoundError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        return
    store = store or find_store()
    if compile_cache:
        from w2s_jax import compile_cache as cache

        cache.enable(warn=lambda text: click.echo(f"warning: {text}", err=True))

    from w2s_jax.outputs import result_folders
    from w2s_jax.run import GridTooLargeError, run_each

    if distributed:
        from w2s_jax.sharding import initialize_distributed

        initialize_distributed(coordinator, num_processes, process_id)
    from w2s_jax.store import StoreError, read_store

    try:
        if weak is None:
            names = read_store(store).weak_names
            if not names:
                raise click.ClickException(f"{store} has no weak model; add one with w2s-extract ... --out {store} --weak NAME")
            weak = names[0]
        names = read_store(store).weak_names if weak == "all" else tuple(w.strip() for w in weak.split(",")
                                                                          if w.strip())
        if not names:
            raise ValueError(f"--weak {weak!r}: name at least one weak model of the store "
                             f"({', '.join(read_store(store).weak_names) or 'it has none'}), or 'all'")
        if len(set(names)) != len(names):
            raise ValueError(f"--weak {weak}: name each weak model once")
        chosen = jax_methods(multi_weak=len(names) > 1) if methods == "all" \
            else tuple(m.strip() for m in methods.split(",") if m.strip())
        chosen = check_methods(with_rounds(with_refinements(chosen, [k.strip() for k in refine.split(",")
                                                                     if k.strip()]), rounds))
        common = dict(
            store=str(store), select=select, seeds=seeds, epochs=epochs, batch_size=_parse_batch_size(batch_size),
            vmap=vmap, fuse=fuse, matmul_dtype=matmul_dtype, seed_axis=seed_axis, bucket=bucket, imports=tuple(plugins),
            grid=_parse_grid(grid),
            hparams=Hparams(lr=lr, temperature=temperature, logit_scale=logit_scale, lp_scale=lp_scale,
                            lp_shrinkage=lp_shrinkage, lp_l2=lp_l2, alpha_max=alpha_max, tau_a=tau_a,
                            raven_lr=raven_lr, refine_k=refine_k, refine_alpha=refine_alpha, refine_c=refine_c))
        jobs = fit_jobs(names, chosen, common)
        labels = [label for job in jobs for label, _ in job]
        folders = result_folders(out, store, labels)
        done = [result for job in jobs for result in run_each([cfg for _, cfg in job], [folders[lb] for lb, _ in job],
                                                              log=click.echo, overwrite=overwrite)]
    except (StoreError, GridTooLargeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for label, (summary, path) in zip(labels, done):
        if len(done) > 1:
            click.echo(f"\n== weak {label} ==")
        click.echo(results.all_tables(summary))
        click.echo(f"\nresults in {path} (reprint with: w2s-fit --show {path})")


def fit_jobs(names, methods, common: dict) -> list[list[tuple[str, FitConfig]]]:
    """The fits of ``--weak A[,B,...]``: ``[[(folder label, FitConfig)], ...]``, each inner list one compiled
    program (w2s_jax.run.run_each). One weak model: one fit of every method. Several: every single-weak method
    for each weak model (one folder each, one program for all), and the multi-weak methods over all of them (folder
    ``A+B``)."""
    if len(names) == 1:
        return [[(names[0], FitConfig(weak=names[0], methods=methods, **common))]]
    multi = tuple(m for m in methods if METHODS[m].target in MULTI_WEAK)
    single = tuple(m for m in methods if m not in multi)
    jobs = [[(w, FitConfig(weak=w, methods=single, **common)) for w in names]] if single else []
    if multi:
        jobs.append([("+".join(names), FitConfig(weak=names[0], ensemble=names, methods=multi, **common))])
    return jobs
