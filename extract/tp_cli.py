"""``w2s-tp``: prompt tuning (CoOp) and the text-encoder ablation on a feature store, in PyTorch.

Writes a results folder in ``w2s-fit``'s format; ``w2s-fit --show FIT_DIR --show TP_DIR`` prints one table.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import click
import numpy as np

from extract import encoders
from extract.prompt import (OPTIMIZERS, PRECISIONS, PromptError, PromptLearner, TextEncoderPrompts, TPConfig,
                            check_text_tower, default_precision, fit_prompts)
from w2s_jax import outputs
from w2s_jax.config import Hparams
from w2s_jax.methods import METHODS, TORCH_METHODS, check_methods, tp_methods
from w2s_jax.splits import seed_splits, stacked_splits
from w2s_jax.store import StoreError, read_store

DEFAULTS = Hparams()


def refined_target(method: str, test, cfg: TPConfig, split):
    """``(weak logits, split)`` a TP model of ``method`` trains on for one seed: the store's weak logits and the
    seed's split, or, for ``METHOD@KIND``, the weak labels refined on the stored features (:mod:`w2s_jax.refine`,
    as w2s-fit does) and the split without the rows a filter drops."""
    weak = test.weak_logits[cfg.weak]
    kind = METHODS[method].refine
    if not kind:
        return weak, split
    import jax
    import jax.numpy as jnp

    from w2s_jax import fit as fitlib, refine

    data = fitlib.make_data(test.features_NxD, weak, test.labels_N)
    teachers = fitlib.make_teachers((refine.Refinement(), refine.spec_of(kind, cfg.hparams)), data,
                                    jax.tree.map(jnp.asarray, split))
    keep = np.asarray(teachers.weight_UxN[1]) > 0
    return np.array(teachers.logits_UxNxK[1]), split._replace(hold_train=split.hold_train[keep[split.hold_train]],
                                                                hold_val=split.hold_val[keep[split.hold_val]])


def run_tp(cfg: TPConfig, out_dir, overwrite: bool = False) -> tuple[dict, Path]:
    out_dir = outputs.check_output(out_dir, folder=True)
    with outputs.exclusive(out_dir):
        return _run_tp(cfg, out_dir, overwrite)


def _run_tp(cfg: TPConfig, out_dir, overwrite) -> tuple[dict, Path]:
    from w2s_jax import results
    from w2s_jax.run import finish_run

    check_methods(cfg.methods, valid=tp_methods(), command="w2s-tp")
    results.check_replace(out_dir, cfg, overwrite)
    store = read_store(cfg.store, need_weak=(cfg.weak,))
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
    n = len(test.ids_N)
    splits = stacked_splits(n, cfg.seeds)
    names = store.provenance.class_names
    makers = {
        "prompt": lambda seed: lambda: PromptLearner(model, encoder.tokenizer, names, n_ctx=cfg.n_ctx,
                                                     ctx_init=cfg.ctx_init, seed=seed),
        "text-encoder": lambda seed: lambda: TextEncoderPrompts(copy.deepcopy(model), encoder.tokenizer, names),
    }
    evals, best_epochs, histories, heads = {}, {}, {}, {}
    t0 = time.perf_counter()
    for method in cfg.methods:
        targets = [refined_target(method, test, cfg, seed_splits(n, s)) for s in range(cfg.seeds)]
        runs = [fit_prompts(method, makers[METHODS[method].head](s), test.features_NxD, weak, test.labels_N, split,
                            cfg, seed=s) for s, (weak, split) in enumerate(targets)]
        evals[method] = {key: np.asarray([[r[0][key]] for r in runs]) for key in runs[0][0]}
        best_epochs[method] = np.asarray([[r[2]] for r in runs])
        histories[method] = {f: np.asarray([[r[1][f]] for r in runs]) for f in runs[0][1]}
        heads[method] = ("prototype", {"params": {"prototypes_KxD": np.stack([[r[3]] for r in runs])}})  # S x 1 x K x D
    timings = {"compile_s": 0.0, "run_s": time.perf_counter() - t0, "torch_device": cfg.device}
    return finish_run(cfg, store, splits, evals, best_epochs, histories, timings, out_dir, heads)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(), required=True, help="Feature store written by w2s-extract (open_clip).")
@click.option("--strong", required=True, help="The store's encoder, as given to w2s-extract (MODEL:TAG or MODEL:/ckpt).")
@click.option("--weak", default=None, help="Weak model in the store. [default: the store's first one]")
@click.option("--methods", default=",".join(TORCH_METHODS), show_default=True)
@click.option("--seeds", default=5, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=512, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
              help="adam: lr --lr, warmup 0.1 + linear decay (paper); coop: SGD 0.002, momentum 0.9, cosine.")
@click.option("--lr", default=DEFAULTS.lr, show_default=True)
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True)
@click.option("--logit-scale", default=DEFAULTS.logit_scale, show_default=True)
@click.option("--n-ctx", default=16, show_default=True, help="Number of context vectors M.")
@click.option("--ctx-init", default="", help="Initialise the context from a phrase, e.g. 'a photo of a'.")
@click.option("--device", default=None, help="[default: cuda when present]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The text tower's compute: fp32, or bf16 autocast (the learned context stays float32). "
                   "[default: bf16 on CUDA, fp32 elsewhere]")
@click.option("--out", type=click.Path(), default=None, help="[default: results/STORE-WEAK-tp]")
def main(store, strong, weak, methods, seeds, epochs, batch_size, optimizer, lr, temperature, logit_scale, n_ctx,
         ctx_init, device, precision, out):
    """Prompt tuning (CoOp) with CE, KD, AuxConf, AdaptConf (+ ceiling) and the text-encoder ablation."""
    from extract.cli import default_device
    from w2s_jax import results

    try:
        weak = weak or (read_store(store).weak_names or ("",))[0]
        device = device or default_device()
        cfg = TPConfig(store=str(store), strong=strong, weak=weak,
                       methods=tuple(m.strip() for m in methods.split(",") if m.strip()), seeds=seeds, epochs=epochs,
                       batch_size=batch_size, optimizer=optimizer, n_ctx=n_ctx, ctx_init=ctx_init,
                       hparams=Hparams(lr=lr, temperature=temperature, logit_scale=logit_scale),
                       device=device, precision=precision or default_precision(device))
        summary, path = run_tp(cfg, out or f"results/{Path(store).stem}-{weak}-tp")
    except (StoreError, PromptError, encoders.EncoderError, outputs.OutputError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(results.all_tables(summary))
    click.echo(f"\nresults in {path}; merge with w2s-fit's: w2s-fit --show FIT_RESULTS --show {path}")


if __name__ == "__main__":
    main()
