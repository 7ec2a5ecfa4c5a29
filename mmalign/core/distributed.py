"""Scale-out strategies for the trainer: DDP, FSDP2 and DeepSpeed as `accelerate launch --config_file` starts them.

- `setup`: FSDP on CPU. accelerate ignores ACCELERATE_USE_FSDP when the Accelerator runs on CPU (its FSDP branch
  covers GPU types only) and silently trains DDP; we promote the state to FSDP with the launcher's plugin.
- `check_world_size`: a requested world size that did not materialise is a ConfigError.
- checkpoints: FSDP2 with SHARDED_STATE_DICT writes torch.distributed.checkpoint (DCP) shards, FULL_STATE_DICT
  gathers the trainable weights and optimizer state into the usual files; DeepSpeed uses its engine's format.
- reference: a frozen copy is sharded like the policy under FSDP2 and refused under ZeRO-3.
- export: the main process gets a plain (unsharded) copy of the policy, built from a meta-device shell.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from accelerate.utils import DistributedType

from .config import ConfigError
from .reference import SharedFrozenCopy

SHARDED_DIR, DEEPSPEED_DIR = "sharded", "deepspeed"
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def release_process_group() -> bool:
    """Destroy the default process group, if any; True when there was one (a multi-process run). Entry points call
    it once, after their last train() returned (train() ends with a barrier; destroying is local, so a rank that
    failed cannot hang the others here), then `exit_without_teardown` when it returns True (`end_run_processes`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        return True
    return False


def main_process_value(value: int, device: torch.device) -> int:
    """`value` as the main process (rank 0) has it, on every rank of a multi-process run; a collective, so every
    rank must call it at the same point. One process: `value` itself."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)  # on the device: NCCL moves device tensors only
    dist.broadcast(t, src=0)
    return int(t.item())


def end_run_processes() -> None:
    """The last call of a multi-process entry point (after its last train() returned and its output is
    printed): destroy the process group and, when there was one, end through `exit_without_teardown(0)`; a
    single-process run returns normally."""
    if release_process_group():
        exit_without_teardown(0)


def exit_without_teardown(code: int = 0) -> None:
    """End a rank whose work is saved, skipping the interpreter's teardown: gloo's worker threads outlive
    destroy_process_group (still in /proc after it and a gc.collect: something keeps the group), and ending them
    during interpreter shutdown intermittently aborted a finished rank ("terminate called without an active
    exception", exit -6: seen in fresh-clone test runs). Logging and stdio are flushed first."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup(acc) -> None:
    """Make accelerate honour an FSDP launch on CPU (gloo): FSDP2 `fully_shard` runs there, accelerate just
    never selects it when `cpu=True`."""
    if acc.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* variables set by `accelerate launch`
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies it back
    acc.state.distributed_type = DistributedType.FSDP


def strategy(acc) -> str:
    """'fsdp2', 'deepspeed' or 'ddp' (also one process); FSDP1 is refused."""
    if acc.distributed_type == DistributedType.FSDP:
        if not acc.is_fsdp2:
            raise ConfigError("FSDP version 1 is not supported; use fsdp_version: 2 (configs/accelerate/fsdp2_*.yaml)")
        return "fsdp2"
    return "deepspeed" if acc.distributed_type == DistributedType.DEEPSPEED else "ddp"


def check_world_size(acc) -> None:
    """Refuse a run that got fewer processes than its launcher asked for, instead of training alone."""
    how = ("launch with `accelerate launch --config_file configs/accelerate/ddp.yaml ...` (or --multi_gpu "
           "--num_processes N, without --cpu) or `torchrun --nproc_per_node N -m mmalign.cli train ...`")
    asked = next((int(os.environ[v]) for v in _SIZE_VARS if os.environ.get(v, "").isdigit()), None)
    if asked is not None and asked != acc.num_processes:
        raise ConfigError(f"the launcher asked for {asked} processes but accelerate set up {acc.num_processes}; {how}")
    # `accelerate launch --cpu --num_processes N` (N > 1) runs its simple launcher: ONE process, with MASTER_ADDR
    # set and no world size (several CPU processes need --mpirun_hostfile there).
    if asked is None and "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
        raise ConfigError(f"`accelerate launch --cpu --num_processes N` starts one process, not N: accelerate's "
                          f"--cpu launcher spawns no workers. To train on N CPU processes, {how}; mmalign uses "
                          f"CPU (gloo) by itself when there is no GPU")


def check_reference(method, acc) -> None:
    """Before `prepare`: a frozen copy cannot follow ZeRO-3 partitioning (shared weights would be emptied)."""
    ref = getattr(method, "ref", None)
    if isinstance(ref, SharedFrozenCopy) and strategy(acc) == "deepspeed" and _zero_stage(acc) == 3:
        raise ConfigError("model.reference: a frozen copy of the policy is not supported under DeepSpeed ZeRO-3 "
                          "(it would be a second, unpartitioned model); use LoRA with model.reference: "
                          "adapters_off, model.reference: cache (MLLM), ZeRO-2 or configs/accelerate/fsdp2_full.yaml")


def prepare_reference(method, acc) -> None:
    """After `prepare`: under FSDP2 shard a frozen-copy reference like the policy (it runs forward-only, every
    rank calls it in step, so its all-gathers line up); adapters_off is the sharded policy itself."""
    ref = getattr(method, "ref", None)
    if isinstance(ref, SharedFrozenCopy) and strategy(acc) == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        ref.model = fsdp2_prepare_model(acc, ref.model.to(acc.device))


def _zero_stage(acc) -> int:
    return acc.state.deepspeed_plugin.zero_stage


def export_shell(policy: torch.nn.Module, acc) -> torch.nn.Module | None:
    """Main process, before `prepare` of a sharded run: the policy's structure with meta-device parameters,
    filled with the gathered weights at export (`full_policy`)."""
    if strategy(acc) == "ddp" or (strategy(acc) == "deepspeed" and _zero_stage(acc) < 3) or not acc.is_main_process:
        return None
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in policy.parameters()}
    return copy.deepcopy(policy, memo)


def full_policy(acc, policy, shell):
    """Collective: the policy with full weights on the main process (None elsewhere), for `save_pretrained`."""
    if shell is None and strategy(acc) != "fsdp2":
        return acc.unwrap_model(policy) if acc.is_main_process else None
    if strategy(acc) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # ZeRO-3: accelerate gathers the 16-bit weights (zero3_save_16bit_model: true)
        full = acc.get_state_dict(policy)
    if not acc.is_main_process:
        return None
    missing, _ = shell.load_state_dict(full, strict=False, assign=True)
    if still_meta := [n for n, p in shell.named_parameters() if p.is_meta]:
        raise RuntimeError(f"export: gathered state dict lacks {still_meta[:5]} (missing keys {missing[:5]})")
    return shell


# ---- checkpoints ----

def _options(full: bool, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, strict=strict)


def _set(model, optimizer, msd, osd, full: bool, path: str) -> None:
    """Load trainable weights and optimizer state; frozen weights are not in checkpoints (rebuilt by build())."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    result = set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                            options=_options(full, strict=False))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    bad = sorted(set(result.missing_keys) - frozen) + sorted(result.unexpected_keys)
    if bad:
        raise RuntimeError(f"{path}: saved trainable parameters do not match the model's (e.g. {bad[:5]})")


def sharded_checkpoints(acc) -> bool:
    if strategy(acc) == "deepspeed":
        return True
    return strategy(acc) == "fsdp2" and "SHARDED" in str(acc.state.fsdp_plugin.state_dict_type)


def checkpoint_state(acc, model, optimizer, trainable: dict):
    """Collective. (params, optimizer state, shard writer or None) for `checkpoint.save_checkpoint`."""
    kind = strategy(acc)
    if kind == "deepspeed":
        return {}, {}, lambda tmp: model.save_checkpoint(os.path.join(tmp, DEEPSPEED_DIR))
    if kind == "ddp":
        return trainable, optimizer.state_dict(), None
    from torch.distributed.checkpoint.state_dict import get_state_dict
    if sharded_checkpoints(acc):
        import torch.distributed.checkpoint as dcp

        def write(tmp):
            msd, osd = get_state_dict(model, optimizer, options=_options(False))
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(tmp, SHARDED_DIR))
        return {}, {}, write
    msd, osd = get_state_dict(model, optimizer, options=_options(True))  # full, on rank 0's CPU
    return msd, osd, None


def restore_state(acc, model, optimizer, state: dict, path: str) -> None:
    """Collective. Load what `checkpoint_state` saved into the prepared model and optimizer."""
    kind = strategy(acc)
    if kind == "deepspeed":
        model.load_checkpoint(os.path.join(path, DEEPSPEED_DIR))
        return
    from torch.distributed.checkpoint.state_dict import get_state_dict
    if state.get("sharded"):
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(model, optimizer, options=_options(False))
        both = {"model": msd, "optimizer": osd}
        dcp.load(both, checkpoint_id=state["sharded"])
        _set(model, optimizer, both["model"], both["optimizer"], False, path)
        return
    if not state["params"]:
        raise RuntimeError(f"{path}: a sharded checkpoint ({SHARDED_DIR}/ or {DEEPSPEED_DIR}/) has no weights "
                           f"this launch can read; resume with the accelerate config that wrote it")
    _set(model, optimizer, state["params"], state["optimizer"], True, path)
