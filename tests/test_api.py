"""The seed's shape of the Python API works over the same code as the CLI."""

import json

from datasets import Dataset

from tunelab import FineTuner, FineTuningConfig


def test_seed_shaped_workflow(tmp_path, tiny_model_dir, qa_rows, capsys):
    config = FineTuningConfig(
        model_name=str(tiny_model_dir),
        dataset_path="",
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        max_length=64,
        precision="fp32",
        batch_size=2,
        gradient_accumulation_steps=1,
    )
    tuner = FineTuner(config)
    model = tuner.prepare_model()
    assert "Trainable parameters: 3,584 (3.51%)" in capsys.readouterr().out
    assert model is tuner.model
    dataset = Dataset.from_list([{"body": f"{r['term']} is {r['definition']}"} for r in qa_rows])
    rows = tuner.prepare_dataset(dataset, text_column="body")
    assert sum(len(r) for r in rows) > 6 * 5
    metrics = tuner.train(rows)
    assert metrics["steps"] == 3
    tuner.save_model()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8
