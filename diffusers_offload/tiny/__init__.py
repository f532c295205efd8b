"""Tiny random-weight pipelines built offline (local tokenizers, no download) for the demo and tests.
May use diffusers, transformers and tokenizers only; nothing else of diffusers_offload.
"""
