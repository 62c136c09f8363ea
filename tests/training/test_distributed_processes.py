"""Training across processes: Ctrl-C then --resume, and two gloo processes matching one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.training.distributed import World, global_batch_note
from tunelab.training.sharding import check_shardable, fsdp_unavailable, wants_fsdp

REPO = Path(__file__).resolve().parents[2]


def write_config(make_config, tmp_path, name, **overrides):
    config = make_config(output_dir=str(tmp_path / name), **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def preference_config(tiny_model_dir, train_path, eval_path, folder, name, accumulation,
                      **settings):  # fmt: skip
    """A preference run's config file in ``folder``: 3 steps of one pair per row (beta 0.5),
    held-out pairs evaluated at the end, every step logged; ``settings`` add to or override."""
    from conftest import tiny_run_config

    values = tiny_run_config(
        tiny_model_dir, train_path, folder / name, **{
            "beta": 0.5, "max_steps": 3, "packing": False, "logging_steps": 1,
            "chat_format": "plain", "eval_path": str(eval_path), "eval_each_epoch": False,
            "plot": False, "gradient_accumulation_steps": accumulation, **settings,
        },
    )  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values.to_dict()))
    return path


def train(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def test_ctrl_c_saves_a_checkpoint_and_resume_completes(make_config, tmp_path):
    path = write_config(
        make_config, tmp_path, "run", max_steps=400, lora_dropout=0.1, save_each_epoch=False
    )  # only the Ctrl-C checkpoint: a fast machine passes an epoch end before the signal lands
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = train(path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert "Ctrl-C: finishing this step, then saving a checkpoint" in output
    assert "training interrupted at step" in output and "--resume to continue" in output
    assert "Traceback" not in output
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    stopped = int(checkpoints[0].name.removeprefix("step-"))
    assert f"interrupted at step {stopped} of 400" in output
    resumed = train(path, "--resume", "--set", "max_steps=" + str(stopped + 2))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == stopped + 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_gloo_processes_match_one_process(make_config, tmp_path):
    # batch_size is per process (as in transformers, TRL, Axolotl, LLaMA-Factory): two processes
    # with gradient_accumulation_steps 1 take the global batch one process takes with 2
    values = dict(max_steps=3, lora_dropout=0.0, batch_size=2)
    single = train(write_config(make_config, tmp_path, "single", gradient_accumulation_steps=2,
                                **values))  # fmt: skip
    assert single.wait(timeout=300) == 0, single.stdout.read()
    pair = torchrun(write_config(make_config, tmp_path, "pair", gradient_accumulation_steps=1,
                                 **values))  # fmt: skip
    assert pair.returncode == 0, pair.stdout + pair.stderr
    note = (
        "Global batch: 4 rows per optimizer step = batch_size 2 per process x "
        "gradient_accumulation_steps 1 x 2 processes."
    )
    assert pair.stdout.count(note) == 1, pair.stdout  # once, by rank 0
    for start in ("Data: 24 rows loaded", "Device ", "Trainable parameters:"):
        assert pair.stdout.count(start) == 1, pair.stdout  # every process loads; rank 0 says so
    assert "would idle" not in pair.stdout + pair.stderr
    same_weights(tmp_path / "single", tmp_path / "pair")
    # only rank 0 wrote: one line per step, as in the single run
    lines = (tmp_path / "pair" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    single_losses = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").open()]
    pair_losses = [json.loads(x)["loss"] for x in lines]
    assert pair_losses == pytest.approx(single_losses, rel=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_a_stop_request_stops_every_process_at_the_same_step(make_config, tmp_path):
    # only rank 0 reads the request (tunelab ui's Stop on a CLI run); the others learn it in
    # the same step, so none is left waiting in a collective the stopped ones never join
    from tunelab.training.guards import request_stop

    path = write_config(
        make_config, tmp_path, "pair", max_steps=400, batch_size=2, save_each_epoch=False,
        gradient_accumulation_steps=1,
    )  # fmt: skip
    metrics = tmp_path / "pair" / "metrics.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tunelab.cli", "train", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        request_stop(tmp_path / "pair")
        output = process.communicate(timeout=300)[0]
    finally:
        if process.poll() is None:  # a hung run: its workers too, not only the launcher
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    assert output.count("Stop requested by tunelab ui: saving a checkpoint") == 1, output
    # both processes stop themselves (none is killed by torchrun for a missing partner), at
    # the same step
    stops = re.findall(r"training interrupted at step (\d+) of 400", output)
    assert len(stops) == 2 and stops[0] == stops[1], output
    stopped = stops[0]
    checkpoints = sorted((tmp_path / "pair" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == [f"step-{int(stopped):06d}"]
    assert not (tmp_path / "pair" / "stop_request.json").exists()


def test_the_global_batch_is_per_process_batch_times_accumulation_times_processes(make_config):
    assert global_batch_note(4, 1, World()) is None  # one process: nothing to explain
    assert global_batch_note(4, 1, World(0, 2)) == (
        "Global batch: 8 rows per optimizer step = batch_size 4 per process x "
        "gradient_accumulation_steps 1 x 2 processes."
    )
    from tunelab.training.loop import steps_per_epoch, total_steps

    config = make_config(batch_size=2, gradient_accumulation_steps=1, num_epochs=2)
    assert steps_per_epoch(10, config) == 5 and steps_per_epoch(10, config, processes=2) == 3
    assert total_steps(10, config, processes=2) == 6


def test_resuming_over_another_process_count_keeps_the_step(make_config, tmp_path):
    from tunelab.api import check_resumable

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    make_config(gradient_accumulation_steps=2).save(run / "tunelab_config.yaml")
    (run / "checkpoints" / "step-000002" / "trainer_state.json").write_text('{"processes": 1}')
    check_resumable(run, make_config(gradient_accumulation_steps=1), processes=2)
    with pytest.raises(TunelabError) as error:
        check_resumable(run, make_config(gradient_accumulation_steps=2), processes=2)
    assert "took 2 micro-batches of batch_size rows per step" in str(error.value)
    assert "Resume with --set gradient_accumulation_steps=1." in str(error.value)


LEAVE_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
from tunelab.training import distributed
from tunelab.training.distributed import all_reduce_sum, gather_objects, init_world

world = init_world("cpu")
assert dist.is_initialized() and world.size == 2
for _ in range(20):
    assert all_reduce_sum(world.rank + 1, world) == 3.0
# held on torch < 2.8 only (its destructor's deadlock), and let go once the backend has: not
# one per call (20), only the last few the gloo threads may still be finishing
assert (len(distributed._held) >= 1) is distributed._HOLD and len(distributed._held) < 10
# the eval's last step: a gather of results (what the rank reports on may differ in size)
assert gather_objects({"rank": world.rank, "text": "x" * world.rank}, world) == [
    {"rank": 0, "text": ""}, {"rank": 1, "text": "x"}
]
atexit._run_exitfuncs()  # what interpreter exit runs first, while Python is still whole
with open(os.path.join(os.path.dirname(__file__), f"rank{world.rank}.txt"), "w") as out:
    held = len(distributed._held)
    out.write(f"initialized after exit hooks: {dist.is_initialized()}, held: {held}")
"""


def run_two_ranks(tmp_path, name, text):
    """Run a script in two gloo processes; returns what each rank wrote to rank<N>.txt (a file
    each: two processes' prints on one pipe can interleave)."""
    script = tmp_path / name
    script.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_the_process_group_is_destroyed_at_exit(tmp_path):
    # left to interpreter shutdown, gloo's threads aborted a finished rank once (SIGABRT); and
    # on torch < 2.8 destroying the group hung in 7 runs of 20 until collectives held their
    # tensors (distributed._held): three launches
    for _ in range(3):
        for text in run_two_ranks(tmp_path, "leave.py", LEAVE_SCRIPT):
            assert text == "initialized after exit hooks: False, held: 0", text


def torchrun(path, *extra):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tunelab.cli", "train", str(path), *extra],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=400,
    )  # fmt: skip


def same_weights(expected, actual, file="adapter_model.safetensors", msg=None):
    """The tensors of ``expected``/``file``, once ``actual``/``file`` is checked to hold the same
    names and values (1e-4 relative, 1e-6 absolute: one process against several)."""
    a, b = load_file(str(expected / file)), load_file(str(actual / file))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=msg)
    return a


def resume_copy(tmp_path, run, step, name):
    """A fresh run folder holding only ``run``'s checkpoint at ``step`` (and its config)."""
    folder = tmp_path / name
    (folder / "checkpoints").mkdir(parents=True)
    checkpoint = tmp_path / run / "checkpoints" / f"step-{step:06d}"
    subprocess.run(["cp", "-r", str(checkpoint), str(folder / "checkpoints")], check=True)
    subprocess.run(["cp", str(tmp_path / run / "tunelab_config.yaml"), str(folder)], check=True)
    return folder


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
def test_fsdp_over_two_gloo_processes_matches_one_process_and_resumes(make_config, tmp_path):
    values = dict(max_steps=4, lora_dropout=0.0, batch_size=2, save_steps=2)
    single_path = write_config(
        make_config, tmp_path, "single", gradient_accumulation_steps=4, **values
    )  # the global batch of 2 processes x gradient_accumulation_steps 2
    single = train(single_path)
    assert single.wait(timeout=300) == 0, single.stdout.read()
    path = write_config(
        make_config, tmp_path, "fsdp", sharding="fsdp", gradient_accumulation_steps=2, **values
    )
    pair = torchrun(path)
    assert pair.returncode == 0, pair.stdout + pair.stderr
    assert "FSDP: 2 decoder layers sharded over 2 processes." in pair.stdout
    assert pair.stdout.count("Run folder:") == 1  # the main process reports
    a = same_weights(tmp_path / "single", tmp_path / "fsdp")
    assert len(a) == 8  # q and v, A and B, 2 layers: whole tensors
    single_losses = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").open()]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "fsdp" / "metrics.jsonl").open()]
    assert losses == pytest.approx(single_losses, rel=1e-5)
    # the sharded checkpoint at step 2 holds the whole adapter and moments, by name
    blob = torch.load(
        tmp_path / "fsdp" / "checkpoints" / "step-000002" / "training_state.pt", weights_only=True
    )
    assert len(blob["optimizer_by_name"]["state"]) == 8
    # resumed sharded, a sharded checkpoint ends where the uninterrupted run did; so do a
    # one-process checkpoint resumed sharded and a sharded one resumed by one process
    resumes = {
        "fsdp_from_fsdp": lambda f: torchrun(path, "--resume", "--set", f"output_dir={f}"),
        "fsdp_from_single": lambda f: torchrun(path, "--resume", "--set", f"output_dir={f}"),
        "single_from_fsdp": lambda f: subprocess.run(
            [
                sys.executable,
                "-m",
                "tunelab.cli",
                "train",
                str(single_path),
                "--resume",
                "--set",
                f"output_dir={f}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        ),  # fmt: skip
    }
    for name, run in resumes.items():
        folder = resume_copy(tmp_path, name.split("_from_")[1], 2, name)
        resumed = run(folder)
        assert resumed.returncode == 0, name + resumed.stdout + resumed.stderr
        assert "Resuming from" in resumed.stdout and "(step 2 of 4)" in resumed.stdout, name
        same_weights(tmp_path / "fsdp", folder, msg=name)


@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
def test_fsdp_needs_no_qlora_adalora_or_8bit_adamw():
    with pytest.raises(TunelabError, match="cannot split QLoRA's 4-bit base weights"):
        check_shardable("qlora")
    with pytest.raises(TunelabError, match="cannot run method: adalora .* Use sharding: none"):
        check_shardable("adalora")
    # it failed at the first step inside torch: "optimizer_update_32bit ... does not have a
    # sharding strategy registered"
    with pytest.raises(TunelabError, match="cannot use optimizer: adamw_8bit .* adamw"):
        check_shardable("lora", "adamw_8bit")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_adalora_on_two_processes_prunes_like_one(make_config, tmp_path):
    """AdaLoRA's rank allocation runs in every process on the summed gradients: the processes
    prune the same ranks, and the adapter (ranks and weights) equals one process's."""
    values = dict(max_steps=6, batch_size=2, method="adalora", learning_rate=2e-2)
    single = train(
        write_config(make_config, tmp_path, "single", gradient_accumulation_steps=4, **values)
    )
    assert single.wait(timeout=300) == 0, single.stdout.read()
    pair = torchrun(
        write_config(make_config, tmp_path, "pair", gradient_accumulation_steps=2, **values)
    )
    assert pair.returncode == 0, pair.stdout + pair.stderr
    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "pair" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    ranks = [a[key].shape[0] for key in a if key.endswith("lora_A")]
    assert ranks and max(ranks) < 12  # pruned from adalora_init_r: the allocation ran
    for key in a:
        assert b[key].shape == a[key].shape, key
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_accelerates_fsdp_plugin_turns_sharding_on(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert wants_fsdp("fsdp") and not wants_fsdp("none")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch's FSDP sets
    assert wants_fsdp("none")
    config = yaml.safe_load((REPO / "examples" / "accelerate" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2


SHARD_SCRIPT = """
import os, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from tunelab.training.distributed import init_world, is_dtensor
from tunelab.training.sharding import clip_gradients, shard_model

def build():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)

ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
whole = build()
whole(input_ids=ids, labels=ids).loss.backward()
params = [p for p in whole.parameters() if p.requires_grad]
expected = float(torch.nn.utils.clip_grad_norm_(params, 0.01)) * 2  # two processes' sums
expected_grads = [p.grad.clone() * 2 for p in params]  # clipped at 0.01 over the whole sum

world = init_world("cpu")
model = build()
assert shard_model(model) == 2 and shard_model(model) == 2  # a second call changes nothing
with torch.no_grad():
    model(input_ids=ids)
# after a forward every layer holds its shards again, not the gathered weights
resharded = all(is_dtensor(p) for p in model.base_model.model.model.layers.parameters())
model(input_ids=ids, labels=ids).loss.backward()  # the same batch on both: gradients sum
sharded = [p for p in model.parameters() if p.requires_grad]
norm = clip_gradients(sharded, 0.01 * 2)
grads = [p.grad.full_tensor() for p in sharded]
ok = resharded and abs(norm - expected) < 1e-5 * expected and all(
    torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(grads, expected_grads))
with open(os.path.join(os.path.dirname(__file__), f"rank{world.rank}.txt"), "w") as out:
    out.write(f"{norm:.6g} {expected:.6g} {ok}")
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
def test_sharded_gradients_are_summed_and_clipped_like_whole_ones(tmp_path):
    for text in run_two_ranks(tmp_path, "shard.py", SHARD_SCRIPT):
        assert text.endswith("True"), text


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_two_gloo_processes_match_one_process_on_a_preference_run(objective, tmp_path,
                                                                   tiny_model_dir):  # fmt: skip
    from conftest import preference_pairs, write_jsonl

    from tunelab.training.preference import REFERENCE_CACHE

    train_path = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("What is a {}?"))
    eval_path = write_jsonl(tmp_path / "held_out.jsonl", preference_pairs("Define {} please."))

    def config(name, accumulation):
        # one pair per row: 8 rows, 4 per optimizer step, so 3 steps run into a second epoch
        # (which reads the reference log-probabilities attached in the first)
        return preference_config(
            tiny_model_dir, train_path, eval_path, tmp_path, name, accumulation,
            objective=objective, learning_rate=5e-3, lora_dropout=0.0,
        )  # fmt: skip

    single = train(config("single", 2))
    assert single.wait(timeout=300) == 0, single.stdout.read()
    pair = torchrun(config("pair", 1))
    assert pair.returncode == 0, pair.stdout + pair.stderr
    same_weights(tmp_path / "single", tmp_path / "pair")

    def records(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").open()]

    # the loss and TRL's reward metrics are the whole step's, not rank 0's half of it
    single_records, pair_records = records("single"), records("pair")
    assert [r["step"] for r in pair_records] == [r["step"] for r in single_records]
    for mine, theirs in zip(pair_records, single_records, strict=True):
        numbers = {k for k, v in theirs.items() if isinstance(v, float) and "rewards" in k}
        numbers |= {"loss", "eval_loss"} & theirs.keys()
        assert numbers, theirs
        for name in numbers:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    cache = tmp_path / "pair" / REFERENCE_CACHE
    if objective == "dpo":
        # the processes shared the reference pass out and wrote one whole cache
        single_cache = json.loads((tmp_path / "single" / REFERENCE_CACHE).read_text())
        pair_cache = json.loads(cache.read_text())
        assert pair_cache.keys() == single_cache.keys() and len(pair_cache) == 32
        for key, value in single_cache.items():
            assert pair_cache[key] == pytest.approx(value, rel=1e-5, abs=1e-5)
        # 16 rows (train and held-out), 2 per forward: the pair ran 4 each, said once
        said = "Reference log-probabilities: 8 forwards run"
        assert pair.stdout.count(said) == 1 and said in single.stdout.read(), pair.stdout
    else:
        assert not cache.exists()  # reference-free
    # no temporary file of a cache write left behind by a second writer
    assert not list((tmp_path / "pair").glob(f".{REFERENCE_CACHE}.*"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
@pytest.mark.parametrize("objective", ["dpo", "simpo", "kto"])
def test_fsdp_preference_run_over_two_gloo_processes_matches_one_process_and_resumes(
    objective, tmp_path, tiny_model_dir
):
    from conftest import preference_pairs, write_jsonl

    from tunelab.training.preference import REFERENCE_CACHE

    # 6 pairs in micro-batches of 2: 3 per epoch, so each epoch's second step has one micro-batch
    # and the second process idles through it; 6 + 4 rows make 5 reference forwards, so the
    # reference pass is uneven too (under FSDP every forward is a collective). KTO makes two
    # answers of a pair (each with its KL sequence): 5 pairs, 5 micro-batches, 9 forwards
    pairs = 5 if objective == "kto" else 6
    train_path = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("What is a {}?", pairs))
    eval_path = write_jsonl(tmp_path / "held_out.jsonl", preference_pairs("Define {} please.", 4))

    def config(name, accumulation, **settings):
        return preference_config(
            tiny_model_dir, train_path, eval_path, tmp_path, name, accumulation,
            objective=objective, learning_rate=5e-3, lora_dropout=0.0, eval_steps=2,
            save_steps=2, **settings,
        )  # fmt: skip

    single = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", str(config("single", 2))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr
    path = config("fsdp", 1, sharding="fsdp")
    pair = torchrun(path)
    assert pair.returncode == 0, pair.stdout + pair.stderr
    assert "FSDP: 2 decoder layers sharded over 2 processes." in pair.stdout
    assert len(same_weights(tmp_path / "single", tmp_path / "fsdp")) == 8

    def records(folder):
        return [json.loads(x) for x in (folder / "metrics.jsonl").open()]

    def same_records(mine, theirs):
        assert [r["step"] for r in mine] == [r["step"] for r in theirs]
        for record, expected in zip(mine, theirs, strict=True):
            names = {k for k in expected if re.match(r"(eval_)?(loss|kl|rewards/|logps/)", k)}
            assert names, expected
            for name in names:
                assert record[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name

    # the losses, TRL's reward metrics and the held-out ones are those of one process
    single_records = records(tmp_path / "single")
    assert {"rewards/margins", "logps/chosen", "eval_rewards/margins"} <= set().union(
        *single_records
    )
    same_records(records(tmp_path / "fsdp"), single_records)
    if objective != "simpo":
        # the reference (the base, the adapter switched off) of the sharded model: the same
        # cache, the forwards dealt out over the processes and counted once
        single_cache = json.loads((tmp_path / "single" / REFERENCE_CACHE).read_text())
        pair_cache = json.loads((tmp_path / "fsdp" / REFERENCE_CACHE).read_text())
        assert pair_cache.keys() == single_cache.keys()
        assert len(pair_cache) == (27 if objective == "kto" else 20)  # kto: with KL sequences
        for key, value in single_cache.items():
            assert pair_cache[key] == pytest.approx(value, rel=1e-5, abs=1e-5)
        said = f"Reference log-probabilities: {9 if objective == 'kto' else 5} forwards run"
        assert pair.stdout.count(said) == 1 and said in single.stdout, pair.stdout
    else:
        assert not (tmp_path / "fsdp" / REFERENCE_CACHE).exists()  # reference-free
    # resumed sharded from the sharded checkpoint at step 2 (its reference cache not copied,
    # so dpo runs the reference pass again on the trained, sharded model with the adapter off):
    # step 3 and the final evaluation as in the uninterrupted run
    folder = resume_copy(tmp_path, "fsdp", 2, "resumed")
    resumed = torchrun(path, "--resume", "--set", f"output_dir={folder}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(step 2 of 3)" in resumed.stdout
    same_weights(tmp_path / "fsdp", folder)
    same_records(records(folder), [r for r in single_records if r["step"] == 3])
    if objective != "simpo":
        assert json.loads((folder / REFERENCE_CACHE).read_text()) == pytest.approx(pair_cache)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
@pytest.mark.parametrize("method", ["dora", "prefix_tuning"])
def test_fsdp_dpo_with_other_adapters_matches_one_process(method, tmp_path, tiny_model_dir):
    """DoRA (a magnitude vector beside A and B) and prefix tuning (virtual tokens outside the
    sharded layers, one row per answer) under FSDP give one process's adapter and losses."""
    from conftest import preference_pairs, write_jsonl

    train_path = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("What is a {}?", 6))
    eval_path = write_jsonl(tmp_path / "held_out.jsonl", preference_pairs("Define {} please.", 4))
    paths = [
        preference_config(
            tiny_model_dir,
            train_path,
            eval_path,
            tmp_path,
            name,
            accumulation,
            objective="dpo",
            method=method,
            learning_rate=5e-3,
            lora_dropout=0.0,
            **settings,
        )  # fmt: skip
        for name, accumulation, settings in (("single", 2, {}), ("fsdp", 1, {"sharding": "fsdp"}))
    ]
    single = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", str(paths[0])],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr
    pair = torchrun(paths[1])
    assert pair.returncode == 0, pair.stdout + pair.stderr
    assert same_weights(tmp_path / "single", tmp_path / "fsdp")
    losses = [
        [json.loads(x).get("loss") for x in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("single", "fsdp")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert len({loss for loss in losses[0] if loss is not None}) > 1  # it trained


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
def test_fsdp_full_fine_tuning_with_dpo_matches_one_process(tmp_path, tiny_model_dir):
    """method: full's reference is a frozen copy of the model (FSDP cannot copy a sharded one),
    and its optimizer steps sharded layers beside the whole embeddings and head."""
    from conftest import preference_pairs, write_jsonl

    from tunelab.training.preference import REFERENCE_CACHE

    train_path = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs("What is a {}?", 6))
    eval_path = write_jsonl(tmp_path / "held_out.jsonl", preference_pairs("Define {} please.", 4))

    def config(name, accumulation, **settings):
        return preference_config(
            tiny_model_dir, train_path, eval_path, tmp_path, name, accumulation,
            objective="dpo", method="full", learning_rate=1e-3, **settings,
        )  # fmt: skip

    single = train(config("single", 2))
    assert single.wait(timeout=300) == 0, single.stdout.read()
    pair = torchrun(config("fsdp", 1, sharding="fsdp"))
    assert pair.returncode == 0, pair.stdout + pair.stderr
    assert "AdamW (per tensor: sharded and whole weights)" in pair.stdout
    a = same_weights(tmp_path / "single", tmp_path / "fsdp", "model.safetensors")
    assert len(a) > 8  # every weight, whole
    records = [
        [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("single", "fsdp")
    ]
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]]
    for mine, theirs in zip(records[1], records[0], strict=True):
        for name in {k for k in theirs if re.match(r"(eval_)?(loss|rewards/|logps/)", k)}:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), name
    single_cache = json.loads((tmp_path / "single" / REFERENCE_CACHE).read_text())
    pair_cache = json.loads((tmp_path / "fsdp" / REFERENCE_CACHE).read_text())
    assert pair_cache.keys() == single_cache.keys() and len(pair_cache) == 20
    for key, value in single_cache.items():
        assert pair_cache[key] == pytest.approx(value, rel=1e-5, abs=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.skipif(fsdp_unavailable() is not None, reason="FSDP2 sum reductions need torch 2.8")
def test_fsdp_full_fine_tuning_matches_one_process(make_config, tmp_path):
    # AdamW over sharded layers beside the whole embeddings and head (fused AdamW failed)
    values = dict(max_steps=2, batch_size=2, method="full", learning_rate=1e-3, plot=False)
    single = train(write_config(make_config, tmp_path, "single", gradient_accumulation_steps=2,
                                **values))  # fmt: skip
    assert single.wait(timeout=300) == 0, single.stdout.read()
    path = write_config(
        make_config, tmp_path, "fsdp", sharding="fsdp", gradient_accumulation_steps=1, **values
    )
    pair = torchrun(path)
    assert pair.returncode == 0, pair.stdout + pair.stderr
    same_weights(tmp_path / "single", tmp_path / "fsdp", "model.safetensors")
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open())
            if "loss" in r
        ]
        for name in ("single", "fsdp")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and len(losses[0]) == 2
