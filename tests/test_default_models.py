"""The embedded default models: real Hugging Face directories of two tokenizer families that add."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_worker.token_bytes import tokenizer_kind
from tests.cluster_helpers import MODELS

# (a, b) pairs from the training split's complement are not needed: these are checked answers.
PROMPTS = [(12, 35), (48, 27), (7, 86), (63, 19), (25, 58), (3, 4), (50, 50), (81, 11), (29, 70), (66, 6)]


@pytest.mark.parametrize(("name", "kind"), [("arith-bpe", "byte_level"), ("arith-sp", "sentencepiece")])
def test_default_model_loads_and_adds(name: str, kind: str) -> None:
    path = MODELS / name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert tokenizer_kind(tokenizer) == kind
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if kind == "sentencepiece":
        assert backend["model"]["byte_fallback"] is True
        assert tokenizer.convert_tokens_to_ids("<0xE4>") != tokenizer.unk_token_id
    text = "héllo 你好 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.chat_template
    right = 0
    with torch.no_grad():
        for a, b in PROMPTS:
            ids = tokenizer(f"{a}+{b}=", return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            right += answer.strip() == str(a + b)
    assert right >= 7, f"{name}: {right}/10"


def test_default_models_are_small() -> None:
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*")) for p in MODELS.iterdir() if p.is_dir()}
    assert set(sizes) >= {"arith-bpe", "arith-sp"}
    assert all(size < 5 << 20 for size in sizes.values()), sizes


def test_training_script_exists_and_documents_the_command() -> None:
    readme = (MODELS / "README.md").read_text()
    assert "scripts/train_default_models.py --out models" in readme
    assert Path(MODELS.parent / "scripts" / "train_default_models.py").is_file()
