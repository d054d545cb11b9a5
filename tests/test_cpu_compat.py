"""The CPU compatibility layer, patch by patch.

For each patch, a fresh process applies every *other* patch, shows that a
probe that exercises the CUDA assumption fails, then applies the patch and
shows that the same probe now works (and gives the right result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from popo_megatron.platform.cpu_compat import DEVICE_INDEPENDENT, PATCHES

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is only applied without CUDA")


def _tiny_gpt(dropout: float = 0.1):
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from popo_megatron.platform import transformer_config_device_kwargs

    tensor_parallel.model_parallel_cuda_manual_seed(0)  # dropout forks the model-parallel RNG state
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        **transformer_config_device_kwargs("local"),
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=64,
        max_sequence_length=32,
        position_embedding_type="rope",
    )


def probe_current_device():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    assert rope.inv_freq.device.type == "cpu"


def probe_causal_mask():
    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.equal(get_default_causal_mask(4), torch.triu(torch.ones(4, 4), diagonal=1).bool())


def probe_synchronize():
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    comm = P2PCommunicator(
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        config=ModelParallelConfig(batch_p2p_comm=True, batch_p2p_sync=True, pipeline_dtype=torch.float32),
    )
    comm._communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=False, recv_next=False, tensor_shape=(1,))


def probe_cuda_literals():
    from popo_megatron.model.forward import forward_logits

    model = _tiny_gpt()
    logits = forward_logits(model, torch.randint(0, 64, (1, 8)), loss_fn=lambda lg: lg.float().mean())
    assert logits[0].shape == (1, 8, 64)
    assert all(p.grad is not None for p in model.parameters())


def probe_tensor_cuda():
    t = torch.ones(2)
    assert t.cuda() is t


def probe_sequence_parallel_norm():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        normalization="RMSNorm",
        tensor_model_parallel_size=2,
        sequence_parallel=True,
    )
    norm = WrappedTorchNorm(config, 8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def probe_cuda_type_checks():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-2, use_distributed_optimizer=True), [ddp])
    before = [p.detach().clone() for p in model.parameters()]
    from popo_megatron.model.forward import forward_logits

    forward_logits(ddp, torch.randint(0, 64, (1, 8)), loss_fn=lambda lg: lg.float().pow(2).mean())
    ddp.finish_grad_sync()
    success, _, _ = optimizer.step()
    assert success
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def probe_rng_tracker():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        first = torch.rand(3)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tracker.fork():
        again = torch.rand(3)
    assert torch.equal(first, again)  # the forked stream is seeded, and reproducible


def probe_optimizer_step_state():
    """Save the distributed optimiser after one step, load it into a fresh one, take one more step on
    both: the weights and every Adam step count must agree."""
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from popo_megatron.model.forward import forward_logits

    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))

    def setup():
        torch.manual_seed(0)
        model = _tiny_gpt(dropout=0.0)  # the two runs' forwards must be deterministic
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model
        )
        return model, ddp, get_megatron_optimizer(OptimizerConfig(lr=1e-2, use_distributed_optimizer=True), [ddp])

    def step(ddp, optimizer):
        ddp.zero_grad_buffer()
        forward_logits(ddp, tokens, loss_fn=lambda lg: lg.float().pow(2).mean())
        optimizer.step()

    model, ddp, optimizer = setup()
    step(ddp, optimizer)
    sharded = {"model": model.sharded_state_dict()}
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=metadata)
    with tempfile.TemporaryDirectory() as ckpt:
        dist_checkpointing.save(sharded, ckpt)
        fresh_model, fresh_ddp, fresh = setup()
        inner = fresh.chained_optimizers[0].optimizer
        for group in inner.param_groups:  # torch's Adam creates its state at the first step
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        request = {"model": fresh_model.sharded_state_dict()}
        request["optimizer"] = fresh.sharded_state_dict(request["model"], is_loading=True, metadata=metadata)
        loaded = dist_checkpointing.load(request, ckpt)
        fresh_model.load_state_dict({k: v for k, v in loaded["model"].items() if "_extra_state" not in k})
        fresh.load_state_dict(loaded["optimizer"])
    step(ddp, optimizer)
    step(fresh_ddp, fresh)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    steps = [float(s["step"]) for s in fresh.chained_optimizers[0].optimizer.state.values()]
    assert steps == [2.0] * len(steps), steps


PROBES = {name[len("probe_") :]: fn for name, fn in globals().items() if name.startswith("probe_")}


def _run_probe(name: str) -> None:
    """Entry point of the subprocess: prints a JSON verdict."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    for other, patch in PATCHES.items():
        if other != name:
            patch()
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
    parallel_state.initialize_model_parallel()
    verdict = {}
    try:
        PROBES[name]()
        verdict["without"] = "passed"
    except Exception as exc:  # the unpatched CUDA assumption
        verdict["without"] = f"{type(exc).__name__}: {exc}"
    PATCHES[name]()
    PROBES[name]()  # must now work; raises (and fails the test) otherwise
    verdict["with"] = "passed"
    print("VERDICT " + json.dumps(verdict))


def test_every_patch_has_a_probe():
    assert set(PROBES) == set(PATCHES)


@pytest.mark.parametrize("name", list(PATCHES))
def test_patch_is_needed_and_sufficient(name):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    tests_dir = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_cpu_compat as t; t._run_probe({name!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("VERDICT ")]
    assert proc.returncode == 0 and lines, f"probe {name} failed with the patch applied:\n{proc.stderr[-3000:]}"
    verdict = json.loads(lines[-1][len("VERDICT ") :])
    assert verdict["without"] != "passed", f"probe {name} passed without its patch: the patch is not needed"
    assert verdict["with"] == "passed"


def test_apply_is_idempotent():
    from popo_megatron.platform.cpu_compat import apply_compat

    apply_compat()
    assert apply_compat() == []  # a second call applies nothing


def test_on_cuda_only_the_device_independent_fixes_apply():
    # In a fresh process (the applied set is per process), with CUDA reported present.
    code = (
        "import torch; torch.cuda.is_available = lambda: True; "
        "from popo_megatron.platform.cpu_compat import apply_compat; print('APPLIED', *apply_compat())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("APPLIED")]
    assert proc.returncode == 0 and lines == [list(DEVICE_INDEPENDENT)], proc.stdout + proc.stderr[-2000:]
