"""tunelab data pairs: reference as chosen, the model's sampled answer as rejected; resumable."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from tunelab.cli import main
from tunelab.config import FineTuningConfig
from tunelab.data.preference import parse_row
from tunelab.errors import TunelabError
from tunelab.preference_pairs import make_pairs


def _data(tmp_path, qa_rows):
    rows = [{"prompt": f"What does {r['term']} mean?", "completion": r["definition"]}
            for r in qa_rows]  # fmt: skip
    return write_jsonl(tmp_path / "qa.jsonl", rows)


def test_pairs_are_written_resumed_and_name_their_model(tmp_path, tiny_model_dir, qa_rows):
    config = FineTuningConfig(dataset_path=str(_data(tmp_path, qa_rows)))
    out = tmp_path / "pairs.jsonl"
    first = make_pairs(config, str(tiny_model_dir), out, max_new_tokens=8, batch_size=2,
                       limit=3, progress=lambda _: None)  # fmt: skip
    assert first["written"] + first["skipped"] == 3
    with out.open("a") as handle:  # an interruption in the middle of a line
        handle.write('{"prompt": "What does')
    second = make_pairs(config, str(tiny_model_dir), out, max_new_tokens=8, batch_size=2,
                        progress=lambda _: None)  # fmt: skip
    assert second["already_there"] == first["written"]
    assert second["written"] + second["skipped"] == len(qa_rows) - first["written"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == first["written"] + second["written"]
    assert len({r["source"] for r in rows}) == len(rows)
    assert {r["rejected_model"] for r in rows} == {str(tiny_model_dir.resolve())}
    by_prompt = {f"What does {r['term']} mean?": r["definition"] for r in qa_rows}
    for i, row in enumerate(rows):
        assert row["chosen"] == by_prompt[row["prompt"]]
        parse_row(row, f"pairs[{i}]", "dpo")  # a valid preference row


def test_a_sampled_answer_joins_a_plain_prompt_as_the_reference_does(tmp_path, tiny_model_dir):
    """generate strips its answers; the reference keeps the space that joins it to the prompt
    (the data stage keeps a plain pair's joins): the rejected answer gets the same join."""
    rows = [{"prompt": f"Q{i}:", "completion": f" answer number {i}"} for i in range(3)]
    config = FineTuningConfig(dataset_path=str(write_jsonl(tmp_path / "qa.jsonl", rows)))
    out = tmp_path / "pairs.jsonl"
    done = make_pairs(config, str(tiny_model_dir), out, max_new_tokens=8, batch_size=3,
                      progress=lambda _: None)  # fmt: skip
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == done["written"] > 0
    for row in written:
        assert row["chosen"].startswith(" answer number")
        assert row["rejected"].startswith(" ") and not row["rejected"].startswith("  ")


def test_pairs_refuse_a_file_they_did_not_write(tmp_path, tiny_model_dir, qa_rows, capsys):
    other = write_jsonl(tmp_path / "notes.jsonl", [{"note": "mine"}])
    code = main(["data", "pairs", str(_data(tmp_path, qa_rows)), "--model", str(tiny_model_dir),
                 "--out", str(other)])  # fmt: skip
    assert code != 0
    assert "is not a pairs file this command wrote" in capsys.readouterr().err
    assert json.loads(other.read_text()) == {"note": "mine"}


def test_pairs_need_prompts_and_answers(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "just prose"}])
    config = FineTuningConfig(dataset_path=str(data))
    with pytest.raises(TunelabError, match="text.jsonl:1: pairs need a prompt and a reference"):
        make_pairs(config, str(tiny_model_dir), tmp_path / "p.jsonl", progress=lambda _: None)


def test_pairs_never_cut_a_one_line_file_they_did_not_write(tmp_path, tiny_model_dir, qa_rows,
                                                            capsys):  # fmt: skip
    """A last line that is not JSON is a crash's cut only after rows this command wrote; a
    user's one-line file without a newline was emptied as if it were one."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, one line, no newline", encoding="utf-8")
    code = main(["data", "pairs", str(_data(tmp_path, qa_rows)), "--model", str(tiny_model_dir),
                 "--out", str(notes)])  # fmt: skip
    assert code != 0
    assert "notes.txt:1 is not a JSON line" in capsys.readouterr().err
    assert notes.read_text(encoding="utf-8") == "my notes, one line, no newline"


def test_a_conversation_is_sampled_as_training_renders_it(tmp_path, tiny_model_dir, monkeypatch):
    # a conversation's prompt was rendered by apply_chat_template alone: without the run's
    # system prompt, which training puts first, so the rejected answers came from another start
    import tunelab.generation as generation
    from tunelab.data.tokenize import render_chat

    rows = [
        {"messages": [{"role": "user", "content": f"What is term {i}?"},
                      {"role": "assistant", "content": f"answer number {i}"}]}
        for i in range(2)
    ]  # fmt: skip
    config = FineTuningConfig(dataset_path=str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    loaded = generation.load_for_inference(str(tiny_model_dir))
    loaded.system_prompt = "Answer in one line."
    seen = []

    def spy(loaded, texts, *args, **options):
        seen.extend(texts)
        return ["a sampled answer"] * len(texts)

    monkeypatch.setattr(generation, "load_for_inference", lambda *a, **k: loaded)
    monkeypatch.setattr(generation, "generate_from_text", spy)
    make_pairs(config, str(tiny_model_dir), tmp_path / "pairs.jsonl", progress=lambda _: None)
    system = {"role": "system", "content": "Answer in one line."}
    assert seen == [
        render_chat(loaded.tokenizer, [system, r["messages"][0]], add_generation_prompt=True)
        for r in rows
    ]
