"""Training of the Moshi LM on the training core: loss, LoRA, stage configs and the task."""
