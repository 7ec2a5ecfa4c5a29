"""The generic training loop on accelerate: exact resume, accumulation, DDP, NaN guard, logging, checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import send_to_device, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from . import row_rng
from .config import ConfigError, Experiment, TrainConfig, check_ranges, save_resolved
from .method import Method


class NonFiniteLossError(RuntimeError):
    pass


class StepBatchSampler:
    """Deterministic, resumable data order. Each epoch is a permutation seeded by (seed, epoch); optimizer step k
    uses perm[k*G:(k+1)*G] with G = batch_size * world * grad_accum (an epoch's incomplete tail is dropped);
    micro-batch j of rank r is the slice starting at (j * world + r) * batch_size. With `with_epoch`, each index
    comes as (epoch, index), the key of per-row randomness (core.row_rng.SeededRows)."""

    def __init__(self, n_rows: int, cfg: TrainConfig, world: int, rank: int, start_step: int,
                 with_epoch: bool = False):
        self.n, self.b, self.accum, self.world, self.rank = n_rows, cfg.batch_size, cfg.grad_accum, world, rank
        self.with_epoch = with_epoch
        self.seed, self.start, self.stop = cfg.seed, start_step, cfg.max_steps
        self.global_batch = self.b * world * self.accum
        self.steps_per_epoch = n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"dataset has {n_rows} rows, fewer than one global batch "
                              f"({self.b} x {world} processes x {self.accum} accumulation = {self.global_batch})")

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step offset within the epoch) of optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def __len__(self):
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self):
        perm_epoch, perm = None, None
        for step in range(self.start, self.stop):
            epoch, offset = self.position(step)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
                perm_epoch, perm = epoch, torch.randperm(self.n, generator=gen)
            batch = perm[offset * self.global_batch:(offset + 1) * self.global_batch]
            for j in range(self.accum):
                start = (j * self.world + self.rank) * self.b
                rows = batch[start:start + self.b].tolist()
                yield [(epoch, i) for i in rows] if self.with_epoch else rows


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor
    return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     scale_parameter=False, relative_step=False, warmup_init=False)


def _make_scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler
    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def _check(cfg: TrainConfig):
    """Settings a run cannot start with, refused before the method builds anything."""
    check_ranges(cfg, "train")  # the loader checks them too; this covers a TrainConfig built in Python
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use 'bf16' or 'no' on CPU")
    if cfg.resume not in ("auto", "never", "force") and not os.path.isfile(
            os.path.join(cfg.resume, "trainer_state.json")):
        raise ConfigError(f"train.resume: {cfg.resume} is not a checkpoint directory (no trainer_state.json); "
                          f"use auto, never, force or a checkpoint path")
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"train.tensorboard: true but tensorboard is not installed ({e})") from None


def _another_run(path: str, step: int, diff: list[str], root: str) -> ConfigError:
    more = f"; and {len(diff) - 8} more" if len(diff) > 8 else ""
    return ConfigError(
        f"train.resume=auto: {path} (step {step}) belongs to another run than this config describes; "
        f"differing (checkpoint -> now): {'; '.join(diff[:8])}{more}. Choose train.resume=never (start over "
        f"here; its checkpoints move to {root}/previous-run), a new output_dir, or train.resume=force "
        f"(resume it anyway)")


def _refuse_another_run_early(exp: Experiment, root: str, global_batch: int) -> None:
    """train.resume=auto: refuse a checkpoint of another run from its recorded config alone, before the method
    loads models and data (the dataset's length is compared later, with the full identity)."""
    found = ckpt.newest_identity(root) if exp.train.resume == "auto" else None
    if found is None:
        return
    path, step, saved = found
    now = ckpt.run_identity(exp, saved.get("dataset_length"), global_batch)
    if diff := ckpt.identity_diff(saved, now):
        raise _another_run(path, step, diff, root)


def _load_resume(cfg: TrainConfig, root: str, identity: dict, acc) -> tuple[str | None, dict | None, list]:
    """(checkpoint, its contents, [(damaged newer checkpoint, problem)]) to resume from, by train.resume: auto
    resumes only this run's own newest intact checkpoint; force and an explicit path resume whatever they find,
    saying what differs; never resumes nothing."""
    if cfg.resume == "never":
        return None, None, []
    say = print if acc.is_main_process else (lambda *_: None)
    if cfg.resume in ("auto", "force"):
        path, state, damaged = ckpt.load_newest_intact(root, acc.process_index)
    else:
        path, state, damaged = cfg.resume, ckpt.load_checkpoint(cfg.resume, acc.process_index), []
    if state is None:
        return None, None, []
    step, saved = state["trainer_state"]["step"], state["trainer_state"].get("identity")
    diff = ckpt.identity_diff(saved, identity) if isinstance(saved, dict) else \
        ["run identity: not recorded (a checkpoint written before mmalign recorded one)"]
    if diff and cfg.resume == "auto":
        raise _another_run(path, step, diff, root)
    if diff:
        say(f"warning: train.resume={cfg.resume}: {path} is from a different run; differing (checkpoint -> now): "
            f"{'; '.join(diff)}")
    say(f"train: resuming from step {step} of {path}")
    return path, state, damaged


def _tidy_checkpoints(cfg: TrainConfig, root: str, damaged: list) -> None:
    """Main process, before the first save: keep other runs' and damaged checkpoints out of keep_last and auto."""
    if cfg.resume == "never" and (n := ckpt.retire_checkpoints(root)):
        print(f"train: train.resume=never: moved {n} earlier checkpoint(s) to {os.path.join(root, 'previous-run')}")
    for path, problem in damaged:
        print(f"train: {problem}; moved it to {ckpt.set_aside(path, '.damaged')} and resumed from the newest "
              f"intact checkpoint instead")


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _restore(path, state, acc, model, optimizer, scheduler) -> int:
    ts = state["trainer_state"]
    if distributed.strategy(acc) != "ddp":  # FSDP2 / DeepSpeed: sharded or gathered state
        distributed.restore_state(acc, model, optimizer, state, path)
    else:
        _restore_plain(path, state, acc.unwrap_model(model), optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if state["rng"] is not None:
        ckpt.set_rng_state(state["rng"])
    elif acc.is_main_process:
        print(f"warning: {path} has no RNG state for rank {acc.process_index}; random streams will differ")
    return ts["step"]


def _restore_plain(path, state, model, optimizer) -> None:
    params = _trainable(model)
    if set(params) != set(state["params"]):
        diff = sorted(set(params) ^ set(state["params"]))
        raise RuntimeError(f"{path}: saved trainable parameters do not match the model's (e.g. {diff[:5]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])


def _guard_finite(acc, loss, batch, step: int, out_dir: str):
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=acc.device)
    total = acc.reduce(bad, "sum") if acc.num_processes > 1 else bad
    if total.item() == 0:
        return
    if bad.item() == 0:
        raise NonFiniteLossError(f"non-finite loss at step {step} on another process (see its error)")
    suffix = f"_rank{acc.process_index}" if acc.num_processes > 1 else ""
    path = os.path.join(out_dir, f"nonfinite_batch_step{step}{suffix}.pt")
    torch.save(send_to_device(batch, "cpu"), path)
    raise NonFiniteLossError(f"non-finite loss ({loss.detach().float().mean().item()}) at step {step}; "
                             f"the batch is saved in {path}")


def train(exp: Experiment, method: Method) -> dict:
    """Run (or resume) training; return {'step', 'metrics', 'output_dir'}."""
    cfg = exp.train
    _check(cfg)
    if dataclasses.is_dataclass(exp.args):  # a method config built in Python skipped the loader's checks
        check_ranges(exp.args)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.cuda.is_available())  # cpu=True lets torchrun on CPU use gloo
    try:
        distributed.setup(acc)  # FSDP launches on CPU
        distributed.check_world_size(acc)
        return _train(exp, method, acc)
    finally:  # let a later train() in this process pick other accelerate settings
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(exp: Experiment, method: Method, acc: Accelerator) -> dict:
    cfg, out = exp.train, exp.output_dir
    ckpt_root = os.path.join(out, "checkpoints")
    set_seed(cfg.seed)  # identical initial weights on every rank
    if acc.is_main_process:
        os.makedirs(out, exist_ok=True)
    global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
    _refuse_another_run_early(exp, ckpt_root, global_batch)
    policy = method.build(acc.device)
    distributed.check_reference(method, acc)
    dataset, report = method.dataset()
    identity = ckpt.run_identity(exp, len(dataset), global_batch)
    resume_from, state, damaged = _load_resume(cfg, ckpt_root, identity, acc)
    if acc.is_main_process:  # only now: a refused run leaves the other run's files as they were
        save_resolved(exp, os.path.join(out, "config.yaml"))
        write_data_report(out, report, len(dataset))
    if len(dataset) == 0:
        raise ConfigError(f"data: no usable rows ({report.summary()})")
    optimizer = _make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])
    scheduler = _make_scheduler(cfg, optimizer)  # stepped by us once per optimizer step, not prepared
    shell = distributed.export_shell(policy, acc)  # sharded runs: a meta-device copy to export into
    policy, optimizer = acc.prepare(policy, optimizer)
    distributed.prepare_reference(method, acc)
    set_seed(cfg.seed, device_specific=True)  # per-rank streams (dropout, noise)

    start = _restore(resume_from, state, acc, policy, optimizer, scheduler) if state else 0
    del state
    metrics_path = os.path.join(out, "metrics.jsonl")
    acc.wait_for_everyone()  # every rank has read its checkpoint before the main process moves any
    if acc.is_main_process:
        _tidy_checkpoints(cfg, ckpt_root, damaged)
        _truncate_metrics(metrics_path, start)
    seeded = row_rng.wants_row_seed(method)  # batches carry row_seed: per-row draws, the same in any layout
    sampler = StepBatchSampler(len(dataset), cfg, acc.num_processes, acc.process_index, start, with_epoch=seeded)
    rows, collate = ((row_rng.SeededRows(dataset, cfg.seed), row_rng.SeededCollate(method.collate)) if seeded
                     else (dataset, method.collate))
    loader = DataLoader(rows, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed * 7919 + start))  # keeps global RNG untouched

    writer = None
    if cfg.tensorboard and acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out, "tensorboard"))
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not acc.is_main_process, desc="train")
    step, sums, last, t0, stopped = start, {}, {}, time.time(), ""

    def save(step):
        params, opt_state, shards = distributed.checkpoint_state(acc, policy, optimizer,
                                                                 _trainable(acc.unwrap_model(policy)))
        ckpt.save_checkpoint(
            ckpt_root, step, params, opt_state, scheduler.state_dict(),
            dict(zip(("epoch", "offset"), sampler.position(step)), global_batch=sampler.global_batch,
                 world_size=acc.num_processes, identity=identity), cfg.keep_last, acc.process_index, acc.wait_for_everyone,
            shards)

    for batch in loader:
        batch = send_to_device(batch, acc.device)
        with acc.accumulate(policy):
            with acc.autocast():
                loss, metrics = method.loss(policy, batch)
            _guard_finite(acc, loss, batch, step + 1, out)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm:
                norm = acc.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                if norm is not None:  # the norm before clipping (DeepSpeed clips inside its engine: None)
                    metrics = {**metrics, "grad_norm": norm * cfg.grad_accum}  # logged as is, not averaged
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
        if not acc.sync_gradients:
            continue
        step += 1
        values = torch.tensor(list(sums.values()), dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            values = acc.reduce(values, "mean")
        last, sums = dict(zip(sums, values.tolist())), {}
        if acc.is_main_process:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:4]})
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _log(metrics_path, writer, step, lr, last, time.time() - t0)
        timed_out = _out_of_time(acc, t0, cfg.max_minutes) and step < cfg.max_steps
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or timed_out:
            save(step)
        if timed_out:
            stopped = f"time budget of {cfg.max_minutes} min reached at step {step} of {cfg.max_steps}"
            if acc.is_main_process:
                if step % cfg.log_every:
                    _log(metrics_path, writer, step, lr, last, time.time() - t0)
                print(f"train: stopping early, {stopped}; resume continues from the checkpoint")
            break
    bar.close()
    if writer:
        writer.close()
    acc.wait_for_everyone()
    full = distributed.full_policy(acc, policy, shell)  # collective: gathers a sharded policy
    if acc.is_main_process:
        _export(method, full, out)
    acc.wait_for_everyone()
    return {"step": step, "metrics": last, "output_dir": out, **({"stopped": stopped} if stopped else {})}


def _export(method: Method, policy, out: str) -> None:
    """`method.save_pretrained` into a temporary folder renamed into place as <out>/final afterwards: a kill
    leaves the previous final/ or the new one, never a partial one."""
    final, tmp, old = (os.path.join(out, n) for n in ("final", ".tmp-final", ".old-final"))
    if not os.path.exists(final) and os.path.exists(old):  # killed between the two renames below
        os.rename(old, final)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    method.save_pretrained(policy, tmp)
    ckpt.fsync_tree(tmp)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_data_report(out_dir: str, report, rows: int) -> None:
    """`data_report.json`: the rows read, kept and skipped by reason (the method's report), and the dataset's
    length (`encoded`: more than `kept` when augmentation adds rows, e.g. both flips)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "data_report.json"), "w") as f:
        json.dump({**report.to_dict(), "encoded": rows}, f, indent=1)
    print(f"data: {report.summary()}")


def _out_of_time(acc, t0: float, max_minutes: float) -> bool:
    """True once `max_minutes` of this run have passed on any rank (all ranks agree, so all stop together)."""
    if not max_minutes:
        return False
    late = time.time() - t0 > max_minutes * 60
    if acc.num_processes == 1:  # no device tensor, no sync
        return late
    return bool(acc.reduce(torch.tensor([float(late)], device=acc.device), "max").item())


def _log(path, writer, step, lr, metrics, elapsed):
    record = {"step": step, "loss": metrics["loss"], "lr": lr,
              **{k: v for k, v in metrics.items() if k != "loss"}, "elapsed_s": round(elapsed, 3)}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer:
        for k, v in record.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                writer.add_scalar(k, v, step)


def _truncate_metrics(path: str, step: int):
    """Drop log lines past the resume point (written by the interrupted run after its last checkpoint), and a
    torn last line (a kill mid-write); any other unreadable line is an error naming it. Rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None and not isinstance(record.get("step"), int):
                raise ValueError("no integer 'step'")
        except (ValueError, AttributeError):
            if i < len(lines):
                raise RuntimeError(f"{path}: line {i} is not a metrics record ({line[:80]!r}); fix or delete the "
                                   f"line, then run again") from None
            print(f"train: {path}: dropped a torn last line ({line[:60]!r}), left by a kill mid-write")
            continue
        if record is not None and record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
