"""The Hugging Face training stack meets a cache: a `datasets` view (dataset.py), a collator
that reuses the training loader's collation (collator.py), a `transformers.Trainer` that
computes the KD loss from the cached teacher (trainer.py), and an axolotl-format export
(axolotl.py). docs/integrations.md shows each in use.

The trainer loads on first use (PEP 562), so the datasets view works without importing
`transformers.Trainer`."""

from importlib import import_module

_WHERE = {
    "cache_dataset": "dataset",
    "sequence_row": "dataset",
    "KDCollator": "collator",
    "cross_tokenizer_collator": "collator",
    "KDTrainer": "trainer",
    "KDLossMixin": "trainer",
    "export_axolotl": "axolotl",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"atkd_cache.hf.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'atkd_cache.hf' has no attribute {name!r}")
