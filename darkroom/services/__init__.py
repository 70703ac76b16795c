"""What the interfaces run on: the studio object (`studio`), the one job queue (`jobs`), the
history of outputs (`history`), X/Y plots (`xyplot`) and managing model files: listing, import,
verify (`model_manager`, `model_inventory`, `model_import`). Imports the core and the library API,
never the CLI or the server."""
