"""Process-group init styles (issue 24 item 1; Note [init styles] in ``hpattn_dist/comm/groups.py``):
the backend config of a group is parsed per device type, and data, metadata and the ring's p2p
grouping are decided per tensor device from it. No process group is needed: the configs are
those ``dist.get_backend_config`` reports for each style (a bare ``init_process_group()`` on a
CUDA build: ``"cpu:gloo,cuda:nccl"``, on a CPU build ``"cpu:gloo"``; ``"gloo"``:
``"cpu:gloo,cuda:gloo"``; ``"nccl"``: ``"cuda:nccl"``; torchtitan's ``"cuda:nccl,cpu:gloo"``). The
same decisions on real gloo groups of every CPU style are in ``tests/distributed/test_init_styles.py``.
"""

from __future__ import annotations

import pytest
import torch

from hpattn_dist.comm.groups import comm_device_for, meta_device_for, parse_backend_config
from hpattn_dist.comm.ring import grouped_p2p

CPU, CUDA1 = torch.device("cpu"), torch.device("cuda", 1)


@pytest.mark.parametrize("config, parsed", [
    ("cuda:nccl,cpu:gloo", {"cuda": "nccl", "cpu": "gloo"}),
    ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}),
    ("cpu:gloo", {"cpu": "gloo"}),
    ("cuda:nccl", {"cuda": "nccl"}),
    ("gloo", {"cpu": "gloo", "cuda": "gloo"}),  # torch's capability list for a bare name
    ("NCCL", {"cuda": "nccl"}),
    ("somebackend", {"*": "somebackend"}),
])
def test_backend_configs_parse_per_device_type(config, parsed):
    assert parse_backend_config(config) == parsed


# config -> (data on CPU, data on cuda:1, metadata of CPU data, metadata of CUDA data, ring grouped on CUDA)
STYLES = {
    "cuda:nccl,cpu:gloo": (CPU, CUDA1, CPU, CPU, True),  # CUDA data never through the host and gloo
    "cpu:gloo,cuda:nccl": (CPU, CUDA1, CPU, CPU, True),  # a bare init on a CUDA build
    "cpu:gloo,cuda:gloo": (CPU, CPU, CPU, CPU, False),  # "gloo": CUDA data staged through the host
    "cuda:nccl": (torch.device("cuda"), CUDA1, torch.device("cuda"), CUDA1, True),  # NCCL only
    "cpu:gloo": (CPU, CPU, CPU, CPU, True),  # a bare init on a CPU build (no CUDA backend to ask)
}


@pytest.mark.parametrize("config", STYLES)
def test_communication_device_per_tensor_device(config):
    data_cpu, data_cuda, meta_cpu, meta_cuda, grouped_cuda = STYLES[config]
    backends = parse_backend_config(config)
    assert comm_device_for(backends, CPU) == data_cpu
    assert comm_device_for(backends, CUDA1) == data_cuda
    assert meta_device_for(backends, CPU) == meta_cpu
    assert meta_device_for(backends, CUDA1) == meta_cuda
    assert grouped_p2p(config, "cuda") is grouped_cuda
    assert grouped_p2p(config, "cpu") is (config == "cuda:nccl")  # only gloo serves the CPU here


def test_a_group_without_a_usable_backend_is_named():
    with pytest.raises(ValueError, match="no backend for cpu tensors"):
        comm_device_for(parse_backend_config("xpu:xccl"), CPU)
