"""The names of the losses and their options, without importing torch (the CLI lists them
as choices, and `atkd-cache --help` should not wait for torch to load)."""

LOSSES = ("atkd", "kd", "ce", "rkl-tokens")  # rkl-tokens: on-policy, losses/onpolicy.py
BASES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")  # the divergences, in docs order
SPLITS = ("cache", "sequence", "batch")
TAILS = ("bucket", "renorm")
MIXES = ("mixture", "confident", "route-by-hard")  # how several teachers join
# students of another tokenizer (losses/crosstok.py); "ce": the student's CE alone on the
# counted chunks (the baseline the others are measured against)
CROSS_TOKENIZER = ("alm", "uld", "gold", "ce")
