"""Train the embedded default models in ``models/``: three tiny LMs that do 2-digit addition.

All learn lines ``"{a}+{b}={a+b}"`` followed by EOS, but with different tokenizer families, so that
a token-level ensemble of them has to bridge their vocabularies:

* ``arith-bpe``: GPT-2 style byte-level BPE (multi-digit number tokens) + ``GPT2LMHeadModel``;
* ``arith-sp``: Llama style SentencePiece BPE with byte fallback (digits split one by one, like
  Llama's ``split_digits``; BOS prepended) + ``LlamaForCausalLM``;
* ``arith-uni``: T5 style SentencePiece Unigram *without* byte fallback (unknown text is ``<unk>``;
  pieces such as ``▁12+`` or ``3+4`` cross the operator) + ``GPTNeoXForCausalLM``.

All are saved as ordinary Hugging Face directories (``AutoTokenizer`` / ``AutoModelForCausalLM``).
A fixed 10% of the (a, b) pairs is held out of training; accuracy is greedy exact match on it.

    python scripts/train_default_models.py --out models [--steps N] [--seed S] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

MAX_OPERAND = 99
SPLIT_SEED = 1234  # the held-out split does not depend on --seed
HELD_OUT_FRACTION = 0.1
CONTEXT = 64
THREADS = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# A little text besides the sums, so the SentencePiece vocabulary has word pieces (the chat roles...).
SP_EXTRA_TEXT = [
    "system: You are a helpful assistant that adds two numbers.",
    "user: What is the sum of these two numbers? Please answer with the number only.",
    "assistant: The answer is the sum of the first and the second number.",
    "The quick brown fox jumps over the lazy dog, and then it sleeps in the sun.",
] * 20
# What a reloaded tokenizer must encode and decode back unchanged (every model but arith-uni).
ROUND_TRIP_TEXTS = ("12+35=47", "héllo 你好 🙂", "user: hi\nassistant: 3+4=7")
# arith-uni has no byte fallback: only text made of its alphabet round-trips.
UNIGRAM_ROUND_TRIP_TEXTS = ("12+35=47", "99+99=198", "user: hi\nassistant: 3+4=7")
Pair = tuple[int, int]


# --- the task ----------------------------------------------------------------------------------


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_text(a: int, b: int) -> str:
    return str(a + b)


def held_out_pairs() -> set[Pair]:
    """A fixed, pseudo-random 10% of all (a, b) pairs, never trained on."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    return set(random.Random(SPLIT_SEED).sample(pairs, round(len(pairs) * HELD_OUT_FRACTION)))


def split_pairs() -> tuple[list[Pair], list[Pair]]:
    """(train, held_out), both in a fixed order."""
    held = held_out_pairs()
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    return [p for p in pairs if p not in held], [p for p in pairs if p in held]


def corpus_lines(pairs: Sequence[Pair]) -> list[str]:
    return [prompt_text(a, b) + answer_text(a, b) for a, b in pairs]


# --- tokenizers --------------------------------------------------------------------------------


def wrap_tokenizer(backend: Tokenizer, **special: str | bool) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=CONTEXT,
        padding_side="left",  # generation-only models
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **special,
    )


def build_bpe_tokenizer(lines: Sequence[str], merges: int) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level pre-tokenizer/decoder, ``<|endoftext|>`` as BOS = EOS = PAD, no BOS added."""
    eos = "<|endoftext|>"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1 + len(alphabet) + merges,
        special_tokens=[eos],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer)
    return wrap_tokenizer(backend, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)


def byte_tokens() -> list[str]:
    return [f"<0x{i:02X}>" for i in range(256)]


def build_sp_tokenizer(lines: Sequence[str], merges: int) -> PreTrainedTokenizerFast:
    """Llama style: Metaspace ("▁", prepend first) BPE with byte fallback, ``<s>`` prepended, ``</s>`` EOS.

    As in Llama's SentencePiece model (``split_digits``), no vocabulary entry mixes a digit with anything
    else: the merges are learned with digits isolated, so every number is spelled digit by digit.
    """
    unk, bos, eos = "<unk>", "<s>", "</s>"
    ascii_alphabet = [chr(c) for c in range(33, 127)]
    scratch = Tokenizer(models.BPE(unk_token=unk))
    scratch.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    specials = [unk, bos, eos, *byte_tokens()]
    alphabet = ["▁", *ascii_alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + merges,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    scratch.train_from_iterator(lines, trainer)
    vocab = scratch.get_vocab(with_added_tokens=False)
    merge_pairs = _bpe_merges(scratch)
    if any(len(tok) > 1 and not tok.startswith("<") and any(c.isdigit() for c in tok) for tok in vocab):
        raise AssertionError("a SentencePiece piece mixes a digit with something else")

    # Rebuilt without the Digits pre-tokenizer, and with the byte tokens as ordinary vocabulary entries.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, unk_token=unk, byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([unk, bos, eos])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return wrap_tokenizer(
        backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=eos, add_bos_token=True, add_eos_token=False
    )


def build_unigram_tokenizer(lines: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """T5 style: Metaspace ("▁", prepend first) Unigram, no byte fallback (unknown text is ``<unk>``).

    Words are split after "=", so a prompt ``a+b=`` is always a token prefix of its answered line; within
    ``▁a+b=`` the pieces may cross "+" (``▁12+``, ``3+4``), unlike the other two tokenizers. ``<s>`` is BOS
    (not added), ``</s>`` EOS = PAD.
    """
    unk, bos, eos = "<unk>", "<s>", "</s>"
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Split("=", behavior="merged_with_previous"),
        ]
    )
    scratch = Tokenizer(models.Unigram())
    scratch.pre_tokenizer = pre_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[unk, bos, eos],
        unk_token=unk,
        initial_alphabet=["▁", "\n", *(chr(c) for c in range(33, 127))],
        max_piece_length=4,
        show_progress=False,
    )
    scratch.train_from_iterator(lines, trainer)
    # The trainer's scores are deterministic except the tie-broken (hash-ordered) ones of the alphabet
    # characters never seen: rounded, and ordered by score then piece, the vocabulary is reproducible.
    trained = [(piece, round(score, 2)) for piece, score in json.loads(scratch.to_str())["model"]["vocab"]]
    specials = [(tok, 0.0) for tok in (unk, bos, eos)]
    pieces = sorted((ps for ps in trained if ps[0] not in {unk, bos, eos}), key=lambda ps: (-ps[1], ps[0]))
    backend = Tokenizer(models.Unigram(specials + pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.add_special_tokens([unk, bos, eos])
    return wrap_tokenizer(backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=eos)


def _bpe_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


# --- models ------------------------------------------------------------------------------------


def build_gpt2(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=128,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def build_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def build_gpt_neox(tokenizer: PreTrainedTokenizerFast) -> GPTNeoXForCausalLM:
    """Parallel attention + MLP residual, LayerNorm, partial rotary embeddings: unlike GPT-2 and Llama."""
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoXForCausalLM(config)


def set_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )


# --- training ----------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode_examples(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[Pair]) -> Batch:
    """Right-padded ``prompt answer EOS`` rows; the loss is on the answer and EOS only."""
    rows: list[list[int]] = []
    prompt_lengths: list[int] = []
    for a, b in pairs:
        prompt_ids = tokenizer(prompt_text(a, b))["input_ids"]
        full_ids = tokenizer(prompt_text(a, b) + answer_text(a, b))["input_ids"] + [tokenizer.eos_token_id]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"the prompt of {a}+{b} is not a token prefix of its full line")
        rows.append(full_ids)
        prompt_lengths.append(len(prompt_ids))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n_prompt) in enumerate(zip(rows, prompt_lengths, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
    return Batch(input_ids, attention_mask, labels)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: PreTrainedModel, data: Batch, steps: int, seed: int, lr: float, batch_size: int = 128) -> float:
    """Plain AdamW loop; returns the wall time in seconds."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(len(data.input_ids), (batch_size,), generator=generator)
        loss = model(
            input_ids=data.input_ids[idx], attention_mask=data.attention_mask[idx], labels=data.labels[idx]
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return time.perf_counter() - start


# --- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[Pair], batch_size: int = 256
) -> list[str]:
    """Greedy continuations of ``"a+b="``, decoded without special tokens (left-padded batches)."""
    answers: list[str] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        inputs = tokenizer([prompt_text(a, b) for a, b in chunk], return_tensors="pt", padding=True)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[Pair]) -> float:
    answers = greedy_answers(model, tokenizer, pairs)
    return sum(got == answer_text(a, b) for got, (a, b) in zip(answers, pairs, strict=True)) / len(pairs)


# --- checks, saving, driver ----------------------------------------------------------------------


def check_round_trip(
    tokenizer: PreTrainedTokenizerFast,
    directory: Path,
    texts: Sequence[str] = ROUND_TRIP_TEXTS,
    byte_fallback: bool = True,
) -> None:
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(directory)
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        if ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise AssertionError(f"{directory}: reloaded tokenizer encodes {text!r} differently")
        if loaded.decode(ids) != text:
            raise AssertionError(f"{directory}: {text!r} decodes back as {loaded.decode(ids)!r}")
    unknown = loaded("héllo 你好 🙂")["input_ids"]
    if byte_fallback and loaded.unk_token != loaded.eos_token and loaded.unk_token_id in unknown:
        raise AssertionError(f"{directory}: byte fallback produced <unk>")


def size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 1e6


@dataclass
class Recipe:
    name: str
    describe: str
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    model: Callable[[PreTrainedTokenizerFast], PreTrainedModel]
    steps: int
    lr: float
    round_trip_texts: Sequence[str] = ROUND_TRIP_TEXTS
    byte_fallback: bool = True


@dataclass
class Report:
    name: str
    describe: str
    params: int
    vocab: int
    steps: int
    seconds: float
    train_acc: float
    held_out_acc: float
    size_mb: float


def run_recipe(recipe: Recipe, out: Path, seed: int, steps: int | None) -> Report:
    train_pairs, held = split_pairs()
    torch.manual_seed(seed)
    tokenizer = recipe.tokenizer()
    model = recipe.model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    n_steps = steps if steps is not None else recipe.steps
    print(f"[{recipe.name}] {recipe.describe}: vocab {len(tokenizer)}, {params:,} parameters, {n_steps} steps")
    seconds = train(model, encode_examples(tokenizer, train_pairs), n_steps, seed, recipe.lr)
    set_generation_config(model, tokenizer)
    held_acc = accuracy(model, tokenizer, held)
    train_acc = accuracy(model, tokenizer, random.Random(seed).sample(train_pairs, 1000))
    directory = out / recipe.name
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    check_round_trip(tokenizer, directory, recipe.round_trip_texts, recipe.byte_fallback)
    report = Report(
        recipe.name, recipe.describe, params, len(tokenizer), n_steps, seconds, train_acc, held_acc, size_mb(directory)
    )
    print(
        f"[{recipe.name}] trained in {seconds:.1f}s; exact match: held-out {held_acc:.1%}, "
        f"train sample {train_acc:.1%}; {report.size_mb:.2f} MB",
        flush=True,
    )
    return report


def recipes() -> list[Recipe]:
    train_pairs, _ = split_pairs()
    lines = corpus_lines(train_pairs)
    return [
        Recipe(
            "arith-bpe",
            "GPT2LMHeadModel + byte-level BPE (GPT-2 style)",
            lambda: build_bpe_tokenizer(lines, merges=100),
            build_gpt2,
            steps=1500,
            lr=3e-3,
        ),
        Recipe(
            "arith-sp",
            "LlamaForCausalLM + SentencePiece-style BPE with byte fallback (Llama style)",
            lambda: build_sp_tokenizer(lines + SP_EXTRA_TEXT, merges=100),
            build_llama,
            steps=800,
            lr=3e-3,
        ),
        Recipe(
            "arith-uni",
            "GPTNeoXForCausalLM + SentencePiece-style Unigram without byte fallback (T5 style)",
            lambda: build_unigram_tokenizer(lines + SP_EXTRA_TEXT, vocab_size=400),
            build_gpt_neox,
            steps=2400,
            lr=3e-3,
            round_trip_texts=UNIGRAM_ROUND_TRIP_TEXTS,
            byte_fallback=False,
        ),
    ]


def write_readme(out: Path, reports: Sequence[Report], seed: int, command: str) -> None:
    rows = "\n".join(
        f"| `{r.name}` | {r.describe} | {r.vocab} | {r.params:,} | {r.steps} | {r.held_out_acc:.1%} "
        f"| {r.train_acc:.1%} | {r.size_mb:.1f} MB |"
        for r in reports
    )
    (out / "README.md").write_text(
        f"""# Embedded default models

Three tiny causal LMs that add two numbers in 0..99: prompted with `12+35=` they answer `47` then EOS.
They use different tokenizer families, for token-level ensembling across vocabularies:

- `arith-bpe`: GPT-2 style byte-level BPE (256 bytes + 100 merges, so most numbers are one token),
  `<|endoftext|>` is BOS = EOS = PAD and no BOS is added.
- `arith-sp`: Llama style SentencePiece BPE with byte fallback (`<0x00>`..`<0xFF>`, Metaspace `▁`,
  `<s>` prepended, `</s>` EOS = PAD); digits are always single tokens, as in Llama.
- `arith-uni`: T5 style SentencePiece Unigram *without* byte fallback (Metaspace `▁`, unseen characters
  are `<unk>`, no BOS added, `</s>` EOS = PAD), in a GPT-NeoX model (parallel residual, partial rotary);
  its pieces may cross the `+` (`▁12+` `35` `=` `47`, `▁3+4` `=` `7`), so it errs elsewhere than the others.

All are plain Hugging Face directories (`AutoTokenizer` / `AutoModelForCausalLM`, safetensors, left padding,
a small `chat_template`). Trained with AdamW on `a+b=sum<eos>` lines (loss on the answer and EOS), seed
{seed}, with a fixed 10% of the (a, b) pairs held out; accuracy is greedy exact match.

| model | kind | vocab | parameters | steps | held-out acc. | train acc. (1000 sampled) | size |
|---|---|---|---|---|---|---|---|
{rows}

Regenerate (CPU, deterministic, about 7 minutes on 2 quiet cores):

    {command}
"""
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: per recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[recipe.name for recipe in recipes()],
        default=None,
        help="train only these models (the others and models/README.md are left alone)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    reports = [
        run_recipe(recipe, args.out, args.seed, args.steps)
        for recipe in recipes()
        if args.only is None or recipe.name in args.only
    ]
    if args.only is None:
        # The documented command names the committed folder, so a retrain elsewhere compares equal.
        options = [f"--seed {args.seed}"] * (args.seed != 0) + [f"--steps {args.steps}"] * (args.steps is not None)
        command = " ".join(["python scripts/train_default_models.py --out models", *options])
        write_readme(args.out, reports, args.seed, command)


if __name__ == "__main__":
    main()
