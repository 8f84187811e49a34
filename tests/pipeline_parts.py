"""Tiny random pipeline components for the diffusers pipeline tests: a character-level CLIP tokenizer
(hand-made vocabulary, no merges), a small CLIP text encoder and a small AutoencoderKL."""

from __future__ import annotations

import json

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tiny_tokenizer(directory) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: one token per letter (and per word-final letter), no merges."""
    vocab = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int) -> CLIPTextModel:
    """A two-layer CLIP text encoder of width ``hidden_size`` over ``tokenizer``'s vocabulary."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))


def tiny_vae() -> AutoencoderKL:
    """A two-level AutoencoderKL with 4 latent channels (8x downsampling -> 2x here)."""
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
