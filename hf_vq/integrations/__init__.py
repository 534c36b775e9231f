"""Integrations with the Hugging Face stack: the transformers HfQuantizer and PEFT LoRA on quantized layers."""
