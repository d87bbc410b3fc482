"""Random tiny models with locally trained tokenizers, saved as Hugging Face directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.tokenizer_factory import byte_level_bpe, sentencepiece_byte_fallback


def random_gpt2(path: Path, seed: int = 0, tokenizer: Any = None) -> Path:
    tokenizer = tokenizer or byte_level_bpe()
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def never_ending_llama(path: Path, tokenizer_source: Path | None = None, context: int = 512) -> Path:
    """A random tiny Llama that never picks end-of-sequence greedily: its generations run long.
    The tokenizer is copied from tokenizer_source, or a locally trained SentencePiece one."""
    tokenizer = (
        sentencepiece_byte_fallback() if tokenizer_source is None else AutoTokenizer.from_pretrained(tokenizer_source)
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0  # logit 0: never the largest
    model.save_pretrained(path)
    return path


def random_llama(path: Path, seed: int = 0, tokenizer: Any = None) -> Path:
    tokenizer = tokenizer or sentencepiece_byte_fallback()
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def random_gemma3(path: Path, seed: int = 0, window: int = 8, tokenizer: Any = None) -> Path:
    """A random tiny Gemma 3: sliding-window layers (window tokens) between full ones, as in Gemma 3 270M."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = tokenizer or sentencepiece_byte_fallback()
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # sharper than a random init, so greedy choices are not near ties
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    return path
