"""Builders for tests, benchmarks and the starter model's training: tiny random models of every
family in the real file layouts (`tiny`), LDM-layout export (`ldm_export`) and tiny LoRAs
(`tiny_lora`). The runtime never imports this package (an import-linter contract checks it)."""
