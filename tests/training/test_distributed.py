"""Each process of a torchrun launch on its own device, and its collectives' tensors there.

No GPU here: torch.cuda and the process group are stood in for, and what tunelab asks of them
(which GPU is made current, which backend and device the group binds, where the tensors handed
to a collective live) is checked. Two real gloo processes are in tests/test_training_processes.py.
"""

import atexit

import pytest
import torch
import torch.distributed as dist

from tunelab.errors import TunelabError
from tunelab.training import distributed, sharding
from tunelab.training.distributed import World


@pytest.fixture
def cuda_rank(monkeypatch):
    """This process as LOCAL_RANK 1 (global RANK 3) of a launch over 4 processes, on a machine
    with 2 GPUs; returns the GPU indices made current."""
    for name, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1])
    return current


def test_each_cuda_process_places_the_run_on_the_gpu_its_local_rank_names(cuda_rank):
    from tunelab.device import choose_placement

    placement = choose_placement("auto")
    assert placement.device == "cuda:1" and placement.precision == "bf16"
    assert cuda_rank == [1]  # made current before anything is put on "cuda"
    assert distributed.local_device("cpu") == "cpu"  # gloo processes stay on the CPU
    assert distributed.local_device("cuda:0") == "cuda:0"  # a device the caller named


def test_the_process_group_binds_nccl_to_the_processs_gpu(cuda_rank, monkeypatch):
    joined = {}

    def init_process_group(backend, **kwargs):
        joined.update(kwargs, backend=backend)

    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_backend", lambda *a: joined["backend"])
    monkeypatch.setattr(atexit, "register", lambda f: f)
    world = distributed.init_world("cuda")
    assert joined == {"backend": "nccl", "device_id": torch.device("cuda", 1)}
    assert (world.rank, world.size, world.device) == (3, 4, torch.device("cuda", 1))
    assert cuda_rank == [1]
    assert distributed.current_world() == world


def test_a_local_rank_without_a_gpu_of_its_own_is_refused(cuda_rank, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TunelabError) as error:
        distributed.local_device("cuda")
    assert "LOCAL_RANK 2" in str(error.value) and "sees 2 GPU(s)" in str(error.value)
    assert "torchrun --nproc_per_node 2" in str(error.value)
    assert cuda_rank == []


class Handed(Exception):
    """Raised by the stand-in collective with the tensor it was given."""


def hand_over(monkeypatch):
    def all_reduce(tensor, *args, **kwargs):
        raise Handed(tensor)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def gpu_world():
    """Process 1 of 2, its collectives on "meta": a stand-in for its GPU (not the CPU, and no
    CUDA build needed)."""
    return World(1, 2, torch.device("meta"))


def test_sums_are_reduced_on_the_worlds_device(monkeypatch):
    hand_over(monkeypatch)
    with pytest.raises(Handed) as handed:
        distributed.all_reduce_sum(3, gpu_world())
    tensor = handed.value.args[0]
    assert tensor.device == torch.device("meta") and tensor.dtype == torch.float64


def test_gradients_are_reduced_on_the_worlds_device(monkeypatch):
    hand_over(monkeypatch)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    with pytest.raises(Handed) as handed:
        distributed.all_reduce_gradients([param], gpu_world())
    assert handed.value.args[0].device == torch.device("meta")


def test_the_gradient_norm_is_reduced_on_the_worlds_device_even_without_gradients(monkeypatch):
    # a process whose parameters got no gradient still joins the all-reduce, on its own device
    hand_over(monkeypatch)
    monkeypatch.setattr(distributed, "current_world", gpu_world)
    with pytest.raises(Handed) as handed:
        sharding.grad_norm([torch.nn.Parameter(torch.ones(3))])
    assert handed.value.args[0].device == torch.device("meta")


def test_start_lines_are_printed_by_the_main_process_only(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.note_once("Device cpu")
    monkeypatch.setenv("RANK", "0")
    distributed.note_once("Trainable parameters")
    assert capsys.readouterr().out == "Trainable parameters\n"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: always
    monkeypatch.setenv("RANK", "1")
    distributed.note_once("one")
    assert capsys.readouterr().out == "one\n"


def test_fsdp_is_refused_at_start_on_a_torch_without_sum_only_reductions(monkeypatch):
    # torch 2.5 to 2.7: FSDP2 divides the gradients, which would change the update
    if sharding.fsdp_unavailable() is None:  # this torch shards: take the method away
        monkeypatch.delattr(sharding._fsdp().FSDPModule, "set_force_sum_reduction_for_comms")
    with pytest.raises(TunelabError) as error:
        sharding.check_shardable("lora")
    assert "sharding: fsdp needs torch 2.8 or later" in str(error.value)
    assert f"this is torch {torch.__version__}" in str(error.value)
    assert "use sharding: none" in str(error.value)
