"""Patches for models whose attention does not go through the Transformers attention interface.

Transformers' Llama, ViT and DeiT dispatch through the interface and need none (``attn_implementation="distr"``);
timm's Vision Transformers call SDPA directly: :mod:`hf_distrattn.patches.timm_vit`.
"""
