"""The embedded default models: real Hugging Face directories of three tokenizer families that add."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_worker.token_bytes import token_byte_table, tokenizer_kind
from tests.cluster_helpers import MODELS
from tests.reference import text_bytes_of_ids

# (a, b) pairs from the training split's complement are not needed: these are checked answers.
PROMPTS = [(12, 35), (48, 27), (7, 86), (63, 19), (25, 58), (3, 4), (50, 50), (81, 11), (29, 70), (66, 6)]


# (name, tokenizer family, byte fallback): arith-uni is SentencePiece Unigram *without* byte fallback.
DEFAULT_MODELS = [
    ("arith-bpe", "byte_level", True),
    ("arith-sp", "sentencepiece", True),
    ("arith-uni", "sentencepiece", False),
]


@pytest.mark.parametrize(("name", "kind", "byte_fallback"), DEFAULT_MODELS)
def test_default_model_loads_and_adds(name: str, kind: str, byte_fallback: bool) -> None:
    path = MODELS / name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert tokenizer_kind(tokenizer) == kind
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if kind == "sentencepiece":
        assert backend["model"]["byte_fallback"] is byte_fallback
    text = "héllo 你好 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if byte_fallback:
        if kind == "sentencepiece":
            assert tokenizer.convert_tokens_to_ids("<0xE4>") != tokenizer.unk_token_id
        assert tokenizer.decode(ids) == text
    else:
        assert backend["model"]["type"] == "Unigram"
        assert tokenizer.unk_token_id in ids  # no byte fallback: unseen characters are <unk>
        ascii_text = "user: 12+35=47\nassistant: 99+99=198"
        assert tokenizer.decode(tokenizer(ascii_text, add_special_tokens=False)["input_ids"]) == ascii_text
    assert tokenizer.chat_template
    right = 0
    with torch.no_grad():
        for a, b in PROMPTS:
            ids = tokenizer(f"{a}+{b}=", return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            right += answer.strip() == str(a + b)
    assert right >= 7, f"{name}: {right}/10"


@pytest.mark.parametrize(("name", "kind", "byte_fallback"), DEFAULT_MODELS)
def test_default_model_tokens_spell_the_text(name: str, kind: str, byte_fallback: bool) -> None:
    """What the worker ships: every token of the task's text maps to its exact bytes (SentencePiece: the
    "▁" Metaspace puts before the first word is a space)."""
    tokenizer = AutoTokenizer.from_pretrained(MODELS / name)
    table, special = token_byte_table(tokenizer)
    assert len(table) == len(tokenizer)
    texts = ["12+35=47", "99+99=198", "3+4=7", "user: 7+86=\nassistant: 93"]
    if byte_fallback:
        texts.append("héllo 你好 🙂")
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not any(special[i] for i in ids), (name, text)
        expected = text.encode() if kind == "byte_level" else b" " + text.encode()
        assert text_bytes_of_ids(table, ids) == expected, (name, text)


def test_default_models_are_small() -> None:
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*")) for p in MODELS.iterdir() if p.is_dir()}
    assert set(sizes) >= {"arith-bpe", "arith-sp", "arith-uni"}
    assert all(size < 5 << 20 for size in sizes.values()), sizes


def test_training_script_exists_and_documents_the_command() -> None:
    readme = (MODELS / "README.md").read_text()
    assert "scripts/train_default_models.py --out models" in readme
    assert Path(MODELS.parent / "scripts" / "train_default_models.py").is_file()
