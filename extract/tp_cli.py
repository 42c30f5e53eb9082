"""``w2s-tp``: prompt tuning (CoOp) and the text-encoder ablation on a feature store, in PyTorch.

Every TP model of the store (methods x weak models x grid points x seeds) trains in one loop, many per step
(:mod:`extract.tp_fit`). Writes one results folder per weak model in ``w2s-fit``'s format, with the same splits,
selection rules and regret table; ``w2s-fit --show FIT_DIR --show TP_DIR`` prints one table.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import click
import jax
import numpy as np
from tqdm.auto import tqdm

from extract import encoders
from extract.prompt import (OPTIMIZERS, PRECISIONS, PromptBank, PromptError, TextEncoderBank, TPConfig,
                            check_text_tower, default_precision)
from extract.prefix import PREFIX_MODES
from extract.tp_fit import TPModel, budget_bytes, chunk_size, make_targets, model_bytes, plan_models, train_chunk
from w2s_jax import fit as fitlib
from w2s_jax import metrics, outputs
from w2s_jax.cli import _parse_grid
from w2s_jax.config import Hparams
from w2s_jax.methods import (METHODS, TORCH_METHODS, check_methods, definitions, import_plugins, tp_methods,
                             with_refinements)
from w2s_jax.select import CRITERIA, at_best_epoch, failed_models
from w2s_jax.splits import stacked_splits
from w2s_jax.store import StoreError, read_store

DEFAULTS = Hparams()


def run_tp(cfg: TPConfig, outs, overwrite: bool = False, log=None, memory_gib: float = 0.0,
           models_per_step: int = 0) -> dict:
    """Fit every TP model of ``cfg`` for each weak model of ``outs`` ({weak: results folder}; a single folder means
    ``cfg.weak`` alone) and write the folders. Returns {weak: (summary, folder)}. The folders are checked and
    locked, and the memory plan made, before any training."""
    outs = {cfg.weak: outs} if isinstance(outs, (str, Path)) else dict(outs)
    outs = {w: outputs.check_output(o, folder=True) for w, o in outs.items()}
    with contextlib.ExitStack() as stack:
        for o in outs.values():
            stack.enter_context(outputs.exclusive(o))
        return _run_tp(cfg, outs, overwrite, log or (lambda text: None), memory_gib, models_per_step)


def default_models_per_step(device: str) -> int:
    """0 (as many as memory allows) on a GPU, where one model's K prompts underfill it; 1 on the CPU, where one
    model's step already keeps the cores busy and a wide step measured slower per model (RESULTS §3: 0.32x at 30
    models, tiny CLIP, K = 345)."""
    return 0 if str(device).startswith("cuda") else 1


def _run_tp(cfg: TPConfig, outs: dict, overwrite, log, memory_gib, models_per_step) -> dict:
    from w2s_jax import results
    from w2s_jax.run import finish_run

    check_methods(cfg.methods, valid=tp_methods(), command="w2s-tp")
    cfg = dataclasses.replace(cfg, defined=definitions(cfg.methods))
    weaks = tuple(outs)
    configs = {w: dataclasses.replace(cfg, weak=w) for w in weaks}
    for w, o in outs.items():
        results.check_replace(o, configs[w], overwrite)
    store = read_store(cfg.store, need_weak=weaks)
    if store.text_TxKxD is None:
        check_text_tower(None, store.provenance.encoder)
    want = encoders.encoder_id(cfg.strong)
    if want != store.provenance.encoder:
        raise StoreError(cfg.store, f"store was built with {store.provenance.encoder}, --strong gives {want}",
                         "pass the --strong the store was extracted with (the same tag or checkpoint file)")
    encoder = encoders.load_strong(cfg.strong, cfg.device)
    model = encoder.model
    check_text_tower(model, encoder.id)
    model.visual = None  # images come from the store; the image tower is never run
    test = store.splits["test"]
    n, dim = test.features_NxD.shape
    k = store.num_classes
    splits = stacked_splits(n, cfg.seeds)
    names = store.provenance.class_names
    hps = cfg.grid_hparams()
    num_h = len(hps.lr)
    models = plan_models(cfg.methods, weaks, cfg.seeds, num_h)
    prompt_models = [m for m in models if METHODS[m.method].head == "prompt"]
    alone = [m for m in models if METHODS[m.method].head != "prompt"]  # the text-encoder ablation: one at a time

    # ---- the memory plan, before any work
    bank = lambda chunk: PromptBank(model, encoder.tokenizer, names, [m.seed for m in chunk],  # noqa: E731
                                    n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, prefix=cfg.prefix)
    probe = bank(models[:1])
    targets_count = cfg.seeds * len(weaks) * (2 + len({METHODS[m].refine for m in cfg.methods}) * num_h)
    fixed = 4 * (sum(p.numel() for p in model.parameters()) + n * (dim + 1) + targets_count * n * (k + 1))
    per_model = model_bytes(model, k, probe.length, cfg, n, dim, probe.prefix_len)
    size = chunk_size(max(len(prompt_models), 1), per_model, fixed, budget_bytes(cfg.device, memory_gib),
                      models_per_step or default_models_per_step(cfg.device))
    chunks = [prompt_models[i:i + size] for i in range(0, len(prompt_models), size)] + [[m] for m in alone]
    log(f"prompt tuning {len(models)} models ({len(cfg.methods)} methods x {len(weaks)} weak model(s) x {num_h} grid "
        f"point(s) x {cfg.seeds} seeds; ceilings once per seed) on {cfg.store}\n  {probe.cut_note}\n"
        f"  {len(prompt_models)} prompt models in {len(chunks) - len(alone)} step(s) of up to {size} "
        f"(about {(fixed + size * per_model) / 2**30:.2f} GiB), {len(alone)} text-encoder model(s) one at a time; "
        f"{cfg.precision} text tower on {cfg.device}")

    # ---- every seed's targets (as w2s-fit's), then the models, chunk by chunk
    targets = make_targets(cfg, cfg.methods, weaks, test.weak_logits, test.features_NxD, test.labels_N, splits)
    t0 = time.perf_counter()
    trained = {}
    with tqdm(total=len(models) * cfg.epochs, unit="model-epoch", desc="prompt tuning", disable=log is None) as bar:
        for chunk in chunks:
            if METHODS[chunk[0].method].head == "prompt":
                module = bank(chunk).to(cfg.device)
            else:
                module = TextEncoderBank(copy.deepcopy(model), encoder.tokenizer, names, cfg.prefix).to(cfg.device)
            outputs_ = train_chunk(module, chunk, targets, test.features_NxD, test.labels_N, splits, cfg, hps,
                                   progress=bar.update)
            trained.update(zip(chunk, outputs_))
    timings = {"compile_s": 0.0, "run_s": time.perf_counter() - t0, "torch_device": cfg.device,
               "models_per_step": size, "prompt_tokens": probe.length, "prompt_prefix_shared": probe.prefix_len}

    # ---- one results folder per weak model
    done = {}
    jsplits = jax.tree.map(jax.numpy.asarray, splits)
    for w in weaks:
        per = {m: [[trained[TPModel(m, "" if METHODS[m].target == "truth" else w, s, h)] for h in range(num_h)]
                   for s in range(cfg.seeds)] for m in cfg.methods}
        data = fitlib.make_data(test.features_NxD, test.weak_logits[w], test.labels_N)
        evals, best_epochs, histories, heads, failed = {}, {}, {}, {}, {}
        for m, grid in per.items():
            histories[m] = {f: np.asarray([[o.history[f] for o in row] for row in grid]) for f in grid[0][0].history}
            best_epochs[m] = np.asarray([[o.best_epoch for o in row] for row in grid])
            variables = {"params": {"prototypes_KxD": np.stack([[o.text_KxD for o in row] for row in grid])}}
            heads[m] = ("prototype", variables)  # S x H x K x D: the applied form of a prompt head
            out = fitlib.FitOutput(variables, histories[m], best_epochs[m])
            evals[m] = {**metrics.evaluate_method(m, out, jax.tree.map(jax.numpy.asarray, hps), data, jsplits, k,
                                                  head="prototype"),
                        "val_score": at_best_epoch(histories[m]["val_score"], best_epochs[m])}
            failed[m] = failed_models(histories[m])
        done[w] = finish_run(configs[w], store, splits, evals, best_epochs, histories, timings, outs[w], heads, data,
                             failed)
        for line in results.failure_lines(done[w][0], failed, hps, w):
            log(line)
    return done


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(), required=True, help="Feature store written by w2s-extract (open_clip).")
@click.option("--strong", required=True, help="The store's encoder, as given to w2s-extract (MODEL:TAG or MODEL:/ckpt).")
@click.option("--weak", default=None, help="Weak model(s) in the store, comma-separated, or 'all': every TP model of "
                                          "every one trains in one loop, one results folder each. [default: the "
                                          "store's first]")
@click.option("--methods", default=",".join(TORCH_METHODS), show_default=True,
              help="Comma-separated TP methods, or 'all' (every method with a prompt or text-encoder head, yours too).")
@click.option("--refine", default="", metavar="KINDS", help="Also fit METHOD@KIND for each method and kind "
                                                            "(knn, graph, filter), as w2s-fit --refine.")
@click.option("--seeds", default=5, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=512, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
              help="adam: lr --lr, warmup 0.1 + linear decay (paper); coop: SGD 0.002, momentum 0.9, cosine.")
@click.option("--lr", default=DEFAULTS.lr, show_default=True)
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True)
@click.option("--logit-scale", default=DEFAULTS.logit_scale, show_default=True)
@click.option("--grid", multiple=True, help="Sweep a hyperparameter: FIELD=V1,V2 (repeatable; cartesian product).")
@click.option("--select", type=click.Choice(CRITERIA), default="agreement", show_default=True,
              help="The label-free rule on hold_val that keeps each model's epoch and each method's grid point.")
@click.option("--n-ctx", default=16, show_default=True, help="Number of context vectors M.")
@click.option("--ctx-init", default="", help="Initialise the context from a phrase, e.g. 'a photo of a'.")
@click.option("--prefix", type=click.Choice(PREFIX_MODES), default="shared", show_default=True,
              help="shared: each model's prompt prefix [SOS][context] runs once for its K classes (exact under the "
                   "causal mask; towers that cannot are run whole, and the log says why); none: every prompt whole.")
@click.option("--device", default=None, help="[default: cuda when present]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The text tower's compute: fp32, or bf16 autocast (the learned context stays float32). "
                   "[default: bf16 on CUDA, fp32 elsewhere]")
@click.option("--memory-gib", default=0.0, show_default=True,
              help="Memory budget of a step in GiB (how many models train at once); 0: 90% of the GPU's free memory, "
                   "or 80% of RAM.")
@click.option("--models-per-step", default=0, show_default=True,
              help="At most this many TP models share a step; 0: as many as memory allows on a GPU, 1 on the CPU "
                   "(where a wide step measured slower per model).")
@click.option("--import", "plugins", multiple=True, metavar="MODULE",
              help="Import a module (or .py file) that registers methods (define_method with head='prompt').")
@click.option("--out", type=click.Path(), default=None,
              help="Results folder [default: results/STORE-WEAK-tp]; with several weak models, their parent folder "
                   "(OUT/WEAK) or a pattern holding {weak}.")
@click.option("--overwrite", is_flag=True, help="Replace a results folder that holds another config.")
def main(store, strong, weak, methods, refine, seeds, epochs, batch_size, optimizer, lr, temperature, logit_scale,
         grid, select, n_ctx, ctx_init, prefix, device, precision, memory_gib, models_per_step, plugins, out,
         overwrite):
    """Prompt tuning (CoOp) with every TP method as data, and the text-encoder ablation."""
    from extract.cli import resolve_device
    from w2s_jax import results

    try:
        import_plugins(plugins)
        names = read_store(store).weak_names
        weaks = tuple(names) if weak == "all" else tuple(w.strip() for w in (weak or (names or ("",))[0]).split(",")
                                                         if w.strip())
        if not weaks:
            raise ValueError(f"--weak {weak!r}: name at least one weak model of the store "
                             f"({', '.join(names) or 'it has none'}), or 'all'")
        chosen = tp_methods(refined=False) if methods.strip() == "all" else tuple(
            m.strip() for m in methods.split(",") if m.strip())
        check_methods(chosen, valid=tp_methods(), command="w2s-tp")
        device = resolve_device(device)
        cfg = TPConfig(store=str(store), strong=strong, weak=weaks[0],
                       methods=with_refinements(chosen, [k.strip() for k in refine.split(",") if k.strip()]),
                       seeds=seeds, epochs=epochs, batch_size=batch_size, optimizer=optimizer, n_ctx=n_ctx,
                       ctx_init=ctx_init, hparams=Hparams(lr=lr, temperature=temperature, logit_scale=logit_scale),
                       device=device, precision=precision or default_precision(device), prefix=prefix,
                       grid=_parse_grid(grid),
                       select=select, imports=tuple(plugins))
        if len(set(weaks)) != len(weaks):
            raise ValueError(f"--weak {weak}: name each weak model once")
        if models_per_step < 0:
            raise ValueError(f"--models-per-step {models_per_step}: give 0 (automatic) or a positive number")
        done = run_tp(cfg, outputs.result_folders(out, store, weaks, "-tp"), overwrite, log=click.echo,
                      memory_gib=memory_gib, models_per_step=models_per_step)
    except (StoreError, PromptError, encoders.EncoderError, outputs.OutputError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for w, (summary, path) in done.items():
        click.echo(f"\n## weak model {w}\n\n{results.all_tables(summary)}")
        click.echo(f"\nresults in {path}; merge with w2s-fit's: w2s-fit --show FIT_RESULTS --show {path}")


if __name__ == "__main__":
    main()
