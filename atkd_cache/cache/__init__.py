"""The cache format: schema (card, arrays), writer, reader, integrity checks."""

from atkd_cache.cache.reader import Cache, CachedSequence, open_cache
from atkd_cache.cache.schema import FORMAT_NAME, FORMAT_VERSION, CacheCard, SequenceRecord
from atkd_cache.cache.writer import CacheWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Cache",
    "CacheCard",
    "CacheWriter",
    "CachedSequence",
    "SequenceRecord",
    "open_cache",
]
