"""prefdiag inside training loops: the TRL callback and the constrained DPO trainer (``prefdiag.integrations.trl``,
which needs trl) and the constrained losses (``prefdiag.integrations.losses``, torch only)."""
