"""Shared fixtures: a tiny randomly initialised Llama-shaped model with a real BPE tokenizer.

Everything is built locally in seconds (no hub, no default-model conversion), so most tests
train for real and still run fast. Tests marked ``slow`` use the real default model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "A compiler translates source code into machine code.",
    "An interpreter executes a program directly, statement by statement.",
    "A byte is eight bits. A kilobyte is 1024 bytes.",
    "The kernel is the core of an operating system.",
    "TCP is a reliable, connection-oriented transport protocol.",
    "A linked list is a data structure of nodes that point to the next node.",
    "Recursion is when a function calls itself.",
    "What does compiler mean? What is a byte? Define kernel.",
] * 4


def build_tiny_model(folder: Path, with_pad_token: bool = False, vocab_size: int = 384) -> Path:
    """Write a tiny Llama (2 layers, width 64) and a trained BPE tokenizer into ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>" if with_pad_token else None,
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never write into the user's cache, except the default-model conversion, which is
    shared (it takes ~20 s) unless TUNELAB_CACHE is already set."""
    os.environ.setdefault("TUNELAB_CACHE", str(Path.home() / ".cache" / "tunelab"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def qa_rows() -> list[dict]:
    terms = {
        "compiler": "A program that translates source code into machine code.",
        "byte": "Eight bits.",
        "kernel": "The core of an operating system.",
        "recursion": "When a function calls itself.",
        "TCP": "A reliable, connection-oriented transport protocol.",
        "linked list": "Nodes that each point to the next node.",
    }
    return [{"term": t, "definition": d} for t, d in terms.items()]


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, qa_rows):
    """A config for a fast run on the tiny model with prompt/completion data in tmp_path."""
    from tunelab.config import FineTuningConfig

    def make(**overrides):
        train = write_jsonl(
            tmp_path / "train.jsonl",
            [
                {"prompt": f"What does {r['term']} mean?", "completion": r["definition"]}
                for r in qa_rows
            ]
            * 4,
        )
        values = dict(
            model_name=str(tiny_model_dir),
            dataset_path=str(train),
            output_dir=str(tmp_path / "run"),
            learning_rate=3e-3,
            max_steps=6,
            batch_size=2,
            gradient_accumulation_steps=2,
            max_length=64,
            precision="fp32",
            logging_steps=1,
            lora_dropout=0.0,
            # the rows repeat on purpose (more steps per epoch); deduplication is tested in
            # tests/data, not here
            dedup_exact=False,
            dedup_near_threshold=None,
        )
        values.update(overrides)
        return FineTuningConfig(**values)

    return make
