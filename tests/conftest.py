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

# the tiny model's width, shared by the tiny models of other families and tokenizers
TINY_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)

# term -> definition: the prompt/completion data of most tests (see ``qa_rows``)
DEFINITIONS = {
    "compiler": "A program that translates source code into machine code.",
    "byte": "Eight bits.",
    "kernel": "The core of an operating system.",
    "recursion": "When a function calls itself.",
    "TCP": "A reliable, connection-oriented transport protocol.",
    "linked list": "Nodes that each point to the next node.",
}

# term -> (a right answer, a wrong one): the preference pairs of the preference tests
PREFERENCE_TERMS = {
    "compiler": ("translates source code", "bakes bread daily"),
    "byte": ("eight bits", "a small dog"),
    "kernel": ("core of an operating system", "a corn seed only"),
    "recursion": ("a function calls itself", "a bicycle race"),
    "cache": ("a fast store of data", "a pirate treasure"),
    "loop": ("code that repeats", "a rope knot"),
    "bus": ("wires that carry data", "a yellow vehicle"),
    "stack": ("last in first out list", "a pile of hay"),
}


def preference_pairs(template: str, count: int = len(PREFERENCE_TERMS)) -> list[dict]:
    """{prompt, chosen, rejected} rows of the first ``count`` terms, the prompt
    ``template.format(term)``."""
    return [
        {"prompt": template.format(term), "chosen": good, "rejected": bad}
        for term, (good, bad) in list(PREFERENCE_TERMS.items())[:count]
    ]


def bnb_cpu_missing() -> str | None:
    """Why bitsandbytes cannot quantize to 4 bits on this CPU, or None when it can."""
    import torch

    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc})"
    try:
        packed, state = bnb_functional.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        bnb_functional.dequantize_4bit(packed, state)
    except Exception as exc:  # noqa: BLE001 - any failure means no CPU backend
        return f"bitsandbytes has no CPU 4-bit backend here ({type(exc).__name__}: {exc})"
    return None


def packed_qkv(seed: int = 0):
    """Packed attention inputs: 2 rows of examples (lengths 7/20/3/10 and 25/15, positions
    restarting per example), grouped-query q (4 heads) and k/v (2 heads) of [2, heads, 40, 8]
    that need gradients, and output weights [2, 40, 4, 8] for a scalar loss."""
    import torch

    lengths = [[7, 20, 3, 10], [25, 15]]
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    torch.manual_seed(seed)
    q = torch.randn(2, 4, 40, 8, requires_grad=True)
    k = torch.randn(2, 2, 40, 8, requires_grad=True)
    v = torch.randn(2, 2, 40, 8, requires_grad=True)
    weights = torch.randn(2, 40, 4, 8)
    return lengths, positions, q, k, v, weights


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
        **TINY_SIZES,
        num_hidden_layers=2,
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


def spread_weights(model, seed: int, std: float = 0.3) -> None:
    """Redraw every weight matrix of ``model`` from N(0, std) after seeding torch with
    ``seed``: the tiny model's initial weights answer every prompt with the same token."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, std)


def bos_adding_tokenizer(model_dir: Path):
    """The tiny model's tokenizer made to put BOS in front by itself, as Llama-2's does."""
    from tokenizers import processors

    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


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


def tiny_run_config(model_dir: Path, dataset: Path, output_dir: Path, /, **settings):
    """A config for a fast fp32 run of the tiny model (batches of 2, 64 tokens) on
    ``dataset``; ``settings`` add or override keys."""
    from tunelab.config import FineTuningConfig

    values = dict(
        model_name=str(model_dir),
        dataset_path=str(dataset),
        output_dir=str(output_dir),
        batch_size=2,
        max_length=64,
        precision="fp32",
    )
    return FineTuningConfig(**{**values, **settings})


@pytest.fixture
def qa_rows() -> list[dict]:
    return [{"term": t, "definition": d} for t, d in DEFINITIONS.items()]


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, qa_rows):
    """A config for a fast run on the tiny model with prompt/completion data in tmp_path."""

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
            learning_rate=3e-3,
            max_steps=6,
            gradient_accumulation_steps=2,
            logging_steps=1,
            lora_dropout=0.0,
            # the rows repeat on purpose (more steps per epoch); deduplication is tested in
            # tests/data, not here
            dedup_exact=False,
            dedup_near_threshold=None,
        )
        values.update(overrides)
        return tiny_run_config(tiny_model_dir, train, tmp_path / "run", **values)

    return make
