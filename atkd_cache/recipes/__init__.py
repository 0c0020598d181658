"""Recipes: whole experiments built from the components (dump, train, evaluate) without
adding to them. The ATKD study (study.py: its stages; study_config.py: the registered
design; study_report.py: the report printed from its results file; stats.py: the paired
statistics) and the on-policy rounds (on_policy.py)."""
