"""Training IP-Adapters (the paper's recipe) with accelerate: data, trainer, checkpoints, export."""
