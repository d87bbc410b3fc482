"""Tiny models of different tokenizer families, each trained to continue one prompt with one text.

Such models agree on the text and on nothing else: a token sequence off the one they learned (say a
character spelt with single-byte tokens the tokenizer would never write) gives noise. So an ensemble
of them writes the text only if each model is conditioned on exactly its own tokens of it, which is
what the conditioning rules (DESIGN.md) promise. Training one takes a second or two on a CPU core.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests import tokenizer_factory

# Emoji split into four byte tokens by SentencePiece with byte fallback, into two to four tokens by the
# byte-level BPEs (🚀 is one token of the wider one), and a word after them.
CONTINUATION = " 🤖🚀 ok"
PROMPT = "Say:"
FAMILIES: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "sentencepiece": tokenizer_factory.sentencepiece_byte_fallback,
    "sentencepiece_legacy": tokenizer_factory.sentencepiece_legacy,
    "byte_level": tokenizer_factory.byte_level_bpe,
    "byte_level_narrow": lambda: tokenizer_factory.byte_level_bpe(merges=50),  # other vocabularies
    "byte_level_mid": lambda: tokenizer_factory.byte_level_bpe(merges=100),
}


def training_ids(tokenizer: PreTrainedTokenizerFast, prompt: str, continuation: str) -> tuple[list[int], int]:
    """The canonical tokens of prompt + continuation + EOS, and how many of them are the prompt's."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + continuation)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:  # generation starts at the prompt's token boundary
        raise ValueError(f"{prompt!r} + {continuation!r} merges across the prompt's end")
    return [*ids, tokenizer.eos_token_id], len(prompt_ids)


def train_to_say(path: Path, family: str, prompt: str = PROMPT, continuation: str = CONTINUATION) -> Path:
    """A tiny Llama with the family's tokenizer, trained until greedy decoding writes exactly the continuation."""
    tokenizer = FAMILIES[family]()
    tokenizer.save_pretrained(path)
    ids, n_prompt = training_ids(tokenizer, prompt, continuation)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    inputs = torch.tensor([ids])
    labels = inputs.clone()
    labels[0, :n_prompt] = -100  # only the continuation is learned
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    with torch.no_grad():
        out = model.generate(inputs[:, :n_prompt], max_new_tokens=len(ids), do_sample=False)
    assert out[0, n_prompt:].tolist() == ids[n_prompt:], (family, out[0, n_prompt:].tolist(), ids[n_prompt:])
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path
