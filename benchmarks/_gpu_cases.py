"""The cases of benchmarks/gpu_check.py: models built from configs (random weights, real shapes), our methods'
own build / dataset / collate / loss around them, timing, FLOP counting, the peer and TRL steps.

Diffusion: `DiffusionEnv` builds the pipeline of build_bench_pipeline.py in memory on the device (saved to disk
only for the peer, which loads a directory); every case gets a fresh UNet from that config and runs the
registered method class, whose `load_parts` is swapped for the in-memory components (no 2.6 B-parameter reload
per case). MLLM: `LlavaEnv` builds the LLaVA once; `MLLMDPO.build` runs as shipped with `load_vlm` answered
from memory, and the LoRA is unloaded again after each case.
"""
from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _sidebyside import PeakMemory  # noqa: E402

PEER = ROOT.parent / "shared/bench/peer_diffusion_dpo_step.py"
# bf16 dense tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name; unknown -> no MFU
PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
         ("L40S", 362e12), ("A10G", 70e12))
METHODS = {"dpo": "diffusion_dpo", "sftw": "diffusion_sft_winners", "inpo": "diffusion_inpo",
           "invdpo": "diffusion_inversion_dpo", "cca": "diffusion_cca", "bco": "diffusion_bco"}
MLLM_VARIANTS = {"dpo": {}, "ipo": {"loss_type": "ipo"}, "hinge": {"loss_type": "hinge"},
                 "robust": {"loss_type": "robust", "label_smoothing": 0.1}, "rpo": {"rpo_alpha": 1.0},
                 "mmdpo": {"mmdpo_w": 1.0}, "mdpo": {}}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAKS if k in name), None)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in [*m.parameters(), *m.buffers()] if t.is_cuda)


class Timer:
    """Warm-up, one FLOP-counted step, then timed steps (cut short at the deadline, at least one). Peak memory
    covers the timed steps: CUDA allocator peak minus what other cases left resident (`resident` bytes), or
    the CPU RSS high-water mark."""

    def __init__(self, dev, deadline: float):
        self.dev, self.deadline = dev, deadline

    def run(self, step, warmup: int, steps: int, count_flops: bool = True, resident: int = 0) -> dict:
        for _ in range(warmup):
            loss = step()
        flops = None
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc:
                loss = step()
            flops = fc.get_total_flops()
        sync(self.dev)
        mem = PeakMemory(str(self.dev))
        mem.reset()
        n, t0 = 0, time.perf_counter()
        while n < steps and (n == 0 or time.time() < self.deadline):
            loss = step()
            n += 1
        sync(self.dev)
        dt = (time.perf_counter() - t0) / n
        peak = mem.peak() - (resident if self.dev.type == "cuda" else 0)
        return {"step_s": dt, "steps_timed": n, "flops_per_step": flops, "peak_mem_gib": peak / 2**30,
                "loss": float(loss.detach().float()) if torch.is_tensor(loss) else None}


# ---- diffusion ----

class DiffusionEnv:
    """One SD1.5- or SDXL-shaped pipeline built from configs on `dev` (random weights); `parts()` hands out
    its encoders with a fresh UNet; `peer_dir()` saves it once (fp16) for the peer script."""

    def __init__(self, size: str, res: int, shrink: int, dev: torch.device, work: Path):
        from build_bench_pipeline import build
        from diffusers import DDPMScheduler

        self.size, self.res, self.dev, self.work = size, res, dev, work / size
        torch.manual_seed(0)
        with torch.device(dev):
            self.pipe = build(size, res, shrink, self.work)
        self.unet_config = dict(self.pipe.unet.config)
        self.sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.dir = None
        self.pairs_dir = {}

    def encoders(self):
        return [self.pipe.vae, self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)]

    def peer_dir(self) -> Path:
        if self.dir is None:
            self.dir = self.work / "pipeline"
            self.pipe.to(torch.float16 if self.dev.type == "cuda" else torch.float32).save_pretrained(self.dir)
        self.drop_unet()
        return self.dir

    def drop_unet(self):
        """Only the UNet's config is needed once the directory exists (or no peer runs)."""
        if getattr(self.pipe, "unet", None) is not None and self.pipe.unet.device.type != "meta":
            self.pipe.unet.to("meta")
        for enc in self.encoders():
            if enc is not None:
                enc.to("cpu")
        free()

    def unet(self, dtype):
        from diffusers import UNet2DConditionModel
        torch.manual_seed(0)
        with torch.device(self.dev):
            return UNet2DConditionModel.from_config(self.unet_config).to(dtype)

    def parts(self, dtype):
        from mmalign.diffusion.pipeline import SDComponents
        p = self.pipe
        te2 = getattr(p, "text_encoder_2", None)
        return SDComponents(str(self.work), p.tokenizer, p.text_encoder.to(dtype), p.vae.float(), self.unet(dtype),
                            self.sched, getattr(p, "tokenizer_2", None), te2.to(dtype) if te2 is not None else None)

    def pairs(self, n: int) -> Path:
        if n not in self.pairs_dir:
            from diffusion_dpo_step import write_pairs
            self.pairs_dir[n] = write_pairs(self.work / f"pairs{n}", n, self.res)
        return self.pairs_dir[n]


def diffusion_setup(env: DiffusionEnv, method: str, lora: bool, pairs: int, knobs: dict, gc_on: bool = False):
    """(method, policy, batch) for one registered pair method on `env`, through its own build/dataset/collate."""
    from mmalign.core.config import from_dict
    from mmalign.core.registry import method_class
    from mmalign.diffusion.preference import PreferenceConfig

    cuda = env.dev.type == "cuda"
    dtype = "bf16" if lora and cuda else "fp32"  # full fine-tune: fp32 master weights under bf16 autocast
    base = method_class(METHODS[method])

    class InMemory(base):
        def load_parts(self, pretrained, device, dtype=torch.float32):
            self.device = device
            self.parts = env.parts(dtype)
            for enc in self.encoders():
                enc.to(device).requires_grad_(False).eval()
            return self.parts

    tmp = Path(tempfile.mkdtemp(dir=env.work))
    model = {"pretrained": str(env.work), "dtype": dtype, "reference": "adapters_off" if lora else "frozen_copy",
             **({"lora_rank": 8, "lora_alpha": 8} if lora else {})}
    cfg = from_dict(PreferenceConfig, {"model": model, "objective": {"beta": 5000.0, **knobs},
                                       "data": {"path": str(env.pairs(pairs)), "resolution": env.res,
                                                "cache_dir": ""}}, "gpu_check")
    m = InMemory(cfg, str(tmp / "out"))
    policy = m.build(env.dev).to(env.dev)
    if gc_on:
        policy.unet.enable_gradient_checkpointing()
    policy.train()
    data, _ = m.dataset()
    return m, policy, m.collate([data[i] for i in range(len(data))])


def make_optimizer(params, name: str):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-5)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # ImportError -> the case reports it is missing
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    raise ValueError(name)


def diffusion_case(env, method, lora, pairs, opts: set, run: dict, timer: Timer, flops_hint=None) -> dict:
    """One training step of `method` (loss -> backward -> optimizer -> zero_grad under bf16 autocast on CUDA);
    opts: channels_last, gc, compile, adafactor, adamw8bit, maxbatch."""
    resident = torch.cuda.memory_allocated() if env.dev.type == "cuda" else 0
    m, policy, batch = diffusion_setup(env, method, lora, pairs, run["knobs"], "gc" in opts)
    if "channels_last" in opts:
        policy.unet.to(memory_format=torch.channels_last)
    if "compile" in opts:
        policy.unet.compile()
    params = [q for q in policy.parameters() if q.requires_grad]
    opt = make_optimizer(params, "adafactor" if "adafactor" in opts else "adamw8bit" if "adamw8bit" in opts
                         else "adamw")
    cuda = env.dev.type == "cuda"
    autocast = torch.autocast(env.dev.type, dtype=torch.bfloat16, enabled=cuda)

    def step_for(b):
        def step():
            x = {k: v.to(env.dev, non_blocking=True) for k, v in b.items()}
            with autocast:
                loss, _ = m.loss(policy, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    count = flops_hint is None and not ({"compile", "gc"} & opts)
    out = timer.run(step_for(batch), run["warmup"] + ("compile" in opts), run["steps"], count, resident)
    if out["flops_per_step"] is None and flops_hint:
        out["flops_per_step"] = flops_hint  # same math: the eager, non-checkpointed count
    out.update(pairs=pairs, pairs_per_s=pairs / out["step_s"],
               trainable_params=sum(q.numel() for q in params), params=sum(q.numel() for q in policy.unet.parameters()))
    if "maxbatch" in opts:
        out["max_batch"] = max_batch(step_for, m, batch, pairs, timer, run, resident)
    m = policy = opt = batch = None  # free before the next case (the step closure holds them)
    free()
    return out


def max_batch(step_for, m, batch, pairs, timer, run, resident) -> dict:
    """Double the pairs per step until OOM, run["maxbatch_cap"] or run["maxbatch_s"]; one warm + one timed step each."""
    t_end = min(timer.deadline, time.time() + run["maxbatch_s"])
    best, b = {"pairs": pairs, "pairs_per_s": None}, pairs
    while 2 * b <= run["maxbatch_cap"] and time.time() < t_end:
        b *= 2
        big = {k: v.repeat_interleave(b // pairs, dim=0) for k, v in batch.items()}
        try:
            r = Timer(timer.dev, t_end).run(step_for(big), 1, 1, False, resident)
        except torch.OutOfMemoryError:
            best["stopped"] = f"OOM at {b} pairs"
            break
        finally:
            big = None
            free()
        best = {"pairs": b, "pairs_per_s": b / r["step_s"], "peak_mem_gib": r["peak_mem_gib"]}
    best.setdefault("stopped", "cap or time bound")
    return best


def peer_case(env: DiffusionEnv, pairs: int, run: dict, timeout: float) -> dict:
    """The peer script in its own process on env's saved pipeline (its own peak; our process holds nothing then)."""
    if not PEER.is_file():
        raise FileNotFoundError(f"peer script not found: {PEER}")
    d = env.peer_dir()
    dtype = "bf16" if env.dev.type == "cuda" else "fp32"
    cmd = [sys.executable, str(PEER), "--pipeline", str(d), "--pairs", str(pairs), "--resolution", str(env.res),
           "--steps", str(run["steps"]), "--warmup", str(run["warmup"]), "--device", env.dev.type, "--dtype", dtype,
           *(["--sdxl"] if env.size == "sdxl" else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"peer failed ({r.returncode}): {r.stderr[-1500:]}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return {"step_s": j["step_s"], "pairs": j["pairs"], "pairs_per_s": j["pairs_per_s"],
            "peak_mem_gib": j["peak_mem_bytes"] / 2**30, "note": "own process; VAE + text encoders every step"}


# ---- multimodal ----

class LlavaEnv:
    """The LLaVA of mllm_dpo_step.py's --shape (7b on GPU, the tiny ShapeWorld one in smoke), built once on `dev`
    (bf16 on CUDA) with sdpa attention, and a ShapeWorld VQA pairs folder."""

    def __init__(self, shape: str, dev: torch.device, work: Path, n_pairs: int):
        from mllm_dpo_step import shape_architecture, shapeworld_rows
        from mmalign.datasets.vl_records import write_vl_pairs_jsonl
        from mmalign.mllm.tiny import build_tiny_llava

        self.dev, self.shape = dev, shape
        self.dtype = "bf16" if dev.type == "cuda" else "fp32"
        arch, words = shape_architecture(shape)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if self.dtype == "bf16" else torch.float32)
        try:
            with torch.device(dev):
                self.model, self.processor = build_tiny_llava(arch, seed=0, words=words)
        finally:
            torch.set_default_dtype(old)
        self.model.config._attn_implementation = "sdpa"  # what load_vlm gives (packing needs sdpa or eager)
        self.rows = shapeworld_rows(n_pairs)
        self.data = write_vl_pairs_jsonl(work / "vl_pairs", self.rows)
        self.work = work

    def resident(self) -> int:
        return cuda_bytes([self.model])

    def load_vlm(self, *a, **k):
        return self.model, self.processor


def mllm_case(env: LlavaEnv, variant: str, batch_size: int, run: dict, timer: Timer) -> dict:
    """One DPO-family step through MLLMDPO (or MLLMmDPO): loss -> backward -> clip 1.0 -> AdamW -> zero_grad."""
    from accelerate.utils import send_to_device

    from mmalign.mllm.dpo import DPOObjective, MLLMDPO, MLLMmDPO, VLDPOConfig, VLPairDataConfig
    from mmalign.mllm.models import VLModelConfig
    from mllm_dpo_step import pair_tokens

    resident = (torch.cuda.memory_allocated() - env.resident()) if env.dev.type == "cuda" else 0
    cfg = VLDPOConfig(model=VLModelConfig(pretrained=str(env.work), dtype=env.dtype, lora_rank=8),
                      data=VLPairDataConfig(path=str(env.data), ref_cache_dir=str(env.work / "refcache")),
                      objective=DPOObjective(beta=0.1, **MLLM_VARIANTS[variant]))
    m = (MLLMmDPO if variant == "mdpo" else MLLMDPO)(cfg, str(env.work / "run"))
    with mock.patch("mmalign.mllm.dpo.load_vlm", env.load_vlm):
        policy = m.build(env.dev)
    try:
        policy.train()
        data, _ = m.dataset()
        batch = m.collate([data[i] for i in range(batch_size)])
        params = [q for q in policy.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss, _ = m.loss(policy, send_to_device(batch, env.dev))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        out = timer.run(step, run["warmup"], run["steps"], True, resident)
        tok = pair_tokens(batch)
        out.update(pairs=batch_size, pairs_per_s=batch_size / out["step_s"], tokens_per_step=tok,
                   tokens_per_s=tok / out["step_s"], packed=m.pack, trainable_params=sum(q.numel() for q in params),
                   params=sum(q.numel() for q in policy.parameters()))
    finally:
        env.model = policy.unload()  # the base without LoRA, for the next case
        env.model.eval()
        m = policy = opt = None
        free()
    return out


def trl_case(env: LlavaEnv, batch_size: int, run: dict) -> dict:
    """TRL's DPOTrainer on the same model (its own LoRA from our LoraConfig; reference = adapters off), timed with
    mllm_dpo_step.Clock (collation + forward + backward + optimizer + Trainer loop)."""
    import argparse

    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from mllm_dpo_step import Clock, time_collator, trl_rows
    from mmalign.mllm.models import VLModelConfig, prepare_trainable

    cuda = env.dev.type == "cuda"
    resident = (torch.cuda.memory_allocated() - env.resident()) if cuda else 0
    clock = Clock(argparse.Namespace(warmup=run["warmup"], steps=run["steps"], device=str(env.dev), profile=0))
    wrapped = prepare_trainable(env.model, VLModelConfig(pretrained="-", dtype=env.dtype, lora_rank=8))
    lora = copy.deepcopy(wrapped.peft_config["default"])
    env.model = wrapped.unload()
    dataset = Dataset.from_list(trl_rows(env.rows[:batch_size * clock.total]))
    with tempfile.TemporaryDirectory(dir=env.work) as tmp:
        set_seed(0)
        cfg = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=clock.total,
                        learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
                        max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], bf16=cuda, fp16=False,
                        use_cpu=not cuda, report_to=[], max_length=None, dataloader_num_workers=0,
                        save_strategy="no", gradient_checkpointing=False, logging_steps=10, seed=0)
        trainer = DPOTrainer(model=env.model, ref_model=None, args=cfg, train_dataset=dataset,
                             processing_class=env.processor, peft_config=lora)
        time_collator(trainer, clock)
        trainer.train()
        r = clock.result()
        tm = trainer.model
        env.model = tm.unload() if hasattr(tm, "unload") else tm  # drop TRL's LoRA again
        trainer = tm = None
    free()
    peak = max(r["peak_mem_steps_bytes"] - resident, 0) if cuda else r["peak_mem_steps_bytes"]
    return {"step_s": r["step_s"], "pairs": batch_size, "pairs_per_s": batch_size / r["step_s"],
            "tokens_per_s": r["tokens_per_s"], "peak_mem_gib": peak / 2**30,
            "note": "DPOTrainer: Trainer loop + processor on PIL images every step"}


# ---- FSDP2 (one process per GPU, launched by torch.distributed.run) ----

def fsdp_worker(run: dict, size: str, res: int, shrink: int, pairs: int, steps: int) -> dict | None:
    """Full fine-tune Diffusion-DPO of the SD1.5-shaped UNet, policy and frozen-copy reference each sharded per
    block with FSDP2 (bf16 params, fp32 reduce); rank 0 returns the result."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    with tempfile.TemporaryDirectory() as work:
        env = DiffusionEnv(size, res, shrink, dev, Path(work))
        env.drop_unet()
        m, policy, batch = diffusion_setup(env, "dpo", False, pairs, run["knobs"])
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32, reduce_dtype=torch.float32)
        for unet in (policy.unet, m.ref.model.unet):
            for blk in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                fully_shard(blk, mp_policy=mp)
            fully_shard(unet, mp_policy=mp)
        opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-5)

        def step():
            loss, _ = m.loss(policy, {k: v.to(dev) for k, v in batch.items()})
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        out = Timer(dev, time.time() + 1e9).run(step, run["warmup"], steps, False)
    dist.destroy_process_group()
    if rank:
        return None
    return {**out, "world": world, "pairs_per_rank": pairs, "pairs_per_s": world * pairs / out["step_s"]}

