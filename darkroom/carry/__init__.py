"""Carrying a setup between machines: offline install bundles (`bundle`, `bundle_target`) and
verifiable, incremental backups (`backup`, `backup_store`). Services-level: uses the model
library and the home, never the interfaces."""
