"""Model-level operations: pick the layers, run a method over them, swap modules, rebuild a saved model."""
