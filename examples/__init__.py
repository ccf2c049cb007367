"""Copyable example LightningModules, datamodules, the LightningCLI demo and benchmarks."""
