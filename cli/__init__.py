"""The `atkd-cache` command line (installed as atkd_cache.cli): parse, call, print."""
