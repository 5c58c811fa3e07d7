"""attnbench's harness: Hydra-configured sweeps, measurement, results, reports and comparison."""
