"""Consolidation: distil memories into LoRA adapters — synthesize → train → evaluate → gate → promote."""
