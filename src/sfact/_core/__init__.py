"""The torch model code of sfact (imported lazily by the AnnData-facing functions)."""
