"""Published numbers of the CPL paper, shipped as data for comparison (``w2s-report --paper``).

Paper: J. Li, S. M. Erfani, L. Feng, J. Bailey, F. Liu, "Exploring Weak-to-Strong Generalization for
CLIP-based Classification", TMLR / arXiv:2511.18396 (2025).
Source of the numbers: its Table 2 (DomainNet, CLIP strong model, accuracy % averaged over 5 seeds),
as quoted in this project's DESIGN.md §1. Only the rows quoted there are shipped: weak, ceiling, CPL,
and the average of the best baseline (KD+LP). We could not obtain the paper's Table 3 numbers
offline, so none are shipped; add them here, with their source, to compare Table 3.
"""

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

TABLE2 = {
    "weak": {"clipart": 67.15, "infograph": 31.71, "painting": 67.90, "quickdraw": 46.70, "real": 85.10,
             "sketch": 52.26},
    "ceiling": {"clipart": 74.27, "infograph": 50.84, "painting": 72.24, "quickdraw": 49.92, "real": 85.34,
                "sketch": 66.64},
    "cpl": {"clipart": 73.10, "infograph": 46.14, "painting": 71.80, "quickdraw": 47.96, "real": 85.41,
            "sketch": 64.01, "avg": 64.74},
    "kd+lp": {"avg": 61.07},
}

# Table 3 (methods x weak models, one domain): {domain: {weak model name in our stores: {row: accuracy %}}}.
# Empty: we had no offline source. Weak names are ours, e.g. "resnet18-finetune", "cvt13-finetune".
TABLE3: dict = {}
