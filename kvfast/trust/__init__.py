"""Trust across parties: signed artifacts (signing), recomputation audits (audit), the usage ledger (ledger)."""
