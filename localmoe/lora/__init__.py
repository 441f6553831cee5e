"""Multi-LoRA: PEFT adapters served beside their base model, several in one batch (S-LoRA / Punica's idea)."""
