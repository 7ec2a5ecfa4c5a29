#!/usr/bin/env python3
"""Our multimodal DPO training step (mmalign.mllm.dpo.MLLMDPO through mmalign.core.trainer.train) vs TRL 1.16's
DPOTrainer step, on the same LLaVA, LoRA, data, batch and optimizer.

Both sides: the model loaded with `load_vlm`, LoRA from `prepare_trainable` (TRL gets the base model plus the same
LoraConfig, so its reference is the base model with adapters off, as ours; seed 0 before the adapter is made),
sigmoid DPO beta 0.1, AdamW (torch) at a constant lr, grad-norm clip 1.0, no autocast, batch --batch pairs,
ShapeWorld VQA rows (32 px PIL images, a question, the right answer vs a wrong one). Steps are timed as a user
sees them: --steps consecutive steps after --warmup, each with its batch's collation, forward, backward, optimizer
step and the loop's own logging (see Clock). Set-up (model load, data preparation: our encode-once pass, our
reference cache) is timed apart. Tokens = non-pad tokens of the [chosen; rejected]
input_ids (image tokens included), counted from each side's own batches.

    python benchmarks/mllm_dpo_step.py --impl ours --shape tiny            # one side, one JSON line
    python benchmarks/mllm_dpo_step.py --side-by-side --shape tiny         # ours, ours-cache, TRL; ratios
    python benchmarks/mllm_dpo_step.py --side-by-side --shape small        # 1024-wide 8-layer Llama, 32k vocab
    python benchmarks/mllm_dpo_step.py --side-by-side --shape 7b --device cuda --dtype bf16   # GPU
    python benchmarks/mllm_dpo_step.py --shape 7b --meta                   # parameter counts only

impls: ours (reference = adapters off), ours-cache (`model.reference: cache`, log-probs computed once, the
one-off in ref_precompute_s), trl (gradient checkpointing off, as ours), trl-gc (TRL's default
gradient_checkpointing=True); --side-by-side runs --impls. Peak memory: CPU RSS high-water mark of the process
(`peak_mem_bytes`, set-up included) and of the timed steps alone (`peak_mem_steps_bytes`); CUDA
max_memory_allocated likewise. On a shared CPU, cpu_tokens_per_s (tokens per second of this process's CPU time)
is steadier than the wall-clock tokens_per_s; with one thread the two agree on an idle machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sidebyside import PeakMemory, medians, run_json, strip_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("ours", "ours-cache", "trl", "trl-gc")
# Larger random LLaVAs (the tiny one is configs/models/shapeworld_llava_tiny.yaml), all with a 32k vocabulary.
# "7b": CLIP ViT-L/14-336 + Llama-2-7B shapes (LLaVA-1.5-7B, 7.06 B parameters). "small336": that tower at 336 px
# (576 image tokens) with 4 layers and a 1024-wide 8-layer Llama. "small": the same Llama with a CLIP ViT-B/32-like
# 4-layer tower at 224 px (49 image tokens) -- small336's 600-token rows take ~2 min a step on one CPU thread.
_LM_SMALL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 16, "max_position_embeddings": 1024}
SHAPES = {
    "small": {"image_size": 224, "vocab_size": 32000, "vision_feature_layer": -2, "text": _LM_SMALL,
              "vision": {"patch_size": 32, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 4,
                         "num_attention_heads": 12}},
    "small336": {"image_size": 336, "vocab_size": 32000, "vision_feature_layer": -2, "text": _LM_SMALL,
                 "vision": {"patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
                            "num_attention_heads": 16}},
    "7b": {"image_size": 336, "vocab_size": 32000, "vision_feature_layer": -2,
           "vision": {"patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16},
           "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}},
}


def args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", choices=IMPLS, default="ours")
    ap.add_argument("--shape", choices=("tiny", *SHAPES), default="tiny")
    ap.add_argument("--model", help="a saved LLaVA directory (default: build --shape into a temp dir)")
    ap.add_argument("--pairs", type=int, default=0, help="0: enough for one epoch (at least 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights' dtype (LoRA stays fp32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--side-by-side", action="store_true", help="run every impl, each in its own process")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--impls", default="ours,ours-cache,trl", help="side by side: which, comma-separated (trl needed)")
    ap.add_argument("--meta", action="store_true", help="build --shape on the meta device; print its sizes")
    ap.add_argument("--profile", type=int, default=0, help="ours/trl: print the top N cProfile entries of the "
                                                           "timed steps (tottime) to stderr")
    return ap.parse_args(argv)


# ---- model and data ----

def shape_architecture(shape: str) -> tuple[dict, list[str] | None]:
    """(architecture, tokenizer words) of the --shape LLaVA: the word-level chat vocabulary padded to the
    shape's vocabulary size (None: the tiny model's own)."""
    from mmalign.mllm.tiny import chat_vocabulary, load_architecture

    if shape == "tiny":
        return load_architecture(ROOT / "configs/models/shapeworld_llava_tiny.yaml"), None
    arch = copy.deepcopy(SHAPES[shape])
    vocab, base = arch.pop("vocab_size"), sorted(set(chat_vocabulary()))
    return arch, base + [f"w{i}" for i in range(vocab - 7 - len(base))]  # 7 special tokens


def build_model(shape: str, out: Path | None, dtype: str = "fp32", device: str = "cpu") -> dict:
    """Build the --shape LLaVA (random weights, word-level chat tokenizer padded to the shape's vocabulary) and
    save it to `out` in `dtype`; out=None builds on the meta device and only counts parameters."""
    from mmalign.mllm.tiny import build_tiny_llava

    arch, words = shape_architecture(shape)
    old = torch.get_default_dtype()
    big = shape == "7b"  # built directly in the weights' dtype on the target device
    torch.set_default_dtype(DTYPES[dtype] if big else torch.float32)
    try:
        with torch.device("meta" if out is None else device if big else "cpu"):
            model, processor = build_tiny_llava(arch, seed=0, words=words)
    finally:
        torch.set_default_dtype(old)
    count = lambda sub: sum(p.numel() for p in sub.parameters())  # noqa: E731
    sizes = {"shape": shape, "params": count(model), "vision_params": count(model.model.vision_tower),
             "lm_params": count(model.model.language_model) + count(model.lm_head),
             "vocab": model.config.text_config.vocab_size, "image_tokens": model.config.image_seq_length}
    if out is not None:
        model.to(DTYPES[dtype]).save_pretrained(out)
        processor.save_pretrained(out)
    return sizes


def shapeworld_rows(n: int, seed: int = 0) -> list[tuple]:
    """(images, question, right answer, wrong answer, meta) from ShapeWorld VQA scenes (32 px renders); the wrong
    answer is another colour / shape / count, the flipped yes/no, or another scene's description."""
    from mmalign.datasets.shapeworld.scene import COLOURS, SHAPES as SW_SHAPES
    from mmalign.mllm.shapeworld import vqa_benchmark

    rng = random.Random(seed)
    bench = vqa_benchmark(seed, n_scenes=n // 3 + 8, per_scene=6, split="train", image_size=32)
    descriptions = [ex.item.answer for ex in bench if ex.item.capability == "description"]
    rows = []
    for ex in bench[:n]:
        q, a, cap = ex.item.question, ex.item.answer, ex.item.capability
        wrong = {"colour": lambda: rng.choice([c for c in COLOURS if c != a]),
                 "shape": lambda: rng.choice([s for s in SW_SHAPES if s != a]),
                 "count": lambda: str(int(a) + rng.choice((1, 2))),
                 "description": lambda: rng.choice([d for d in descriptions if d != a])
                 }.get(cap, lambda: "no" if a == "yes" else "yes")()
        rows.append(([ex.image], q, a, wrong, {}))
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} ShapeWorld rows for --pairs {n}")
    return rows


def trl_rows(rows) -> list[dict]:
    """The same rows in TRL's conversational vision form (the images first in the user turn)."""
    return [{"images": images,
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r}]}]}
            for images, q, c, r, _ in rows]


# ---- timing ----

class Clock:
    """`tick` at the start of every batch's collation, with the number of optimizer steps done so far; `count`
    with the batch's attention mask. The timed window runs from the first tick after --warmup steps to the first
    after --warmup + --steps, so it holds --steps steps and as many collations on either side, whether or not
    the data loader fetches a batch ahead (accelerate's does, in TRL's Trainer)."""

    def __init__(self, a):
        if a.warmup < 1 or a.steps < 1:
            raise SystemExit("--warmup and --steps must be >= 1")
        self.w, self.s, self.total = a.warmup, a.steps, a.warmup + a.steps + 2
        self.mem, self.cuda = PeakMemory(a.device), a.device.startswith("cuda")
        self.tokens, self.stamps, self.checksum, self.profiler, self.top = [], [], None, None, a.profile
        self.start = self.end = self.peak_before = self.peak_steps = None
        self.step_end = []  # the first tick after each timed step

    def tick(self, model, done: int):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stamps.append(now)
        if self.checksum is None:  # adapters as initialised (before any update): equal on both sides for one seed
            self.checksum = sum(float(p.detach().double().abs().sum()) for n, p in model.named_parameters()
                                if "lora_A" in n)
        if self.start is not None and self.end is None and done - self.w > len(self.step_end):
            self.step_end.append(now)
        if done == self.w and self.start is None:
            self.peak_before = self.mem.peak()
            self.reset_ok = self.mem.reset()
            if self.top:
                import cProfile
                self.profiler = cProfile.Profile()
                self.profiler.enable()
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.cpu = time.process_time()
            self.start = time.perf_counter()
        elif done == self.w + self.s and self.end is None:
            self.end, self.cpu = now, time.process_time() - self.cpu
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults
            self.peak_steps = self.mem.peak()
            if self.profiler:
                self.profiler.disable()

    def count(self, tokens: int):
        self.tokens.append(int(tokens))

    def result(self) -> dict:
        if self.end is None:
            raise RuntimeError(f"the timed window did not close ({len(self.stamps)} collations seen)")
        dt, tok = self.end - self.start, sum(self.tokens[self.w:self.w + self.s])  # batch j feeds step j
        if self.profiler:
            import io
            import pstats
            buf = io.StringIO()
            pstats.Stats(self.profiler, stream=buf).sort_stats("tottime").print_stats(self.top)
            print(buf.getvalue(), file=sys.stderr)
        ends = [self.start] + self.step_end[:self.s - 1] + [self.end]
        return {"step_s": dt / self.s, "cpu_step_s": self.cpu / self.s, "cpu_tokens_per_s": tok / self.cpu,
                "step_times_s": [round(b - a, 4) for a, b in zip(ends, ends[1:])],
                "minor_page_faults": self.faults, "steps_per_s": self.s / dt, "tokens_per_s": tok / dt,
                "timed_tokens": tok,
                "peak_mem_bytes": max(self.peak_before, self.peak_steps), "peak_mem_steps_bytes": self.peak_steps,
                "peak_mem_before_steps": self.peak_before, "peak_reset_ok": self.reset_ok,
                "lora_init_checksum": self.checksum}


# ---- the two sides ----

def time_collator(trainer, clock: Clock):
    """Wrap a TRL trainer's collator so `clock` ticks at each step and counts its tokens; returns the original."""
    collator = trainer.data_collator

    def timed(examples):
        clock.tick(trainer.model, trainer.state.global_step)
        batch = collator(examples)
        clock.count(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = timed
    return collator


def pair_tokens(batch: dict) -> int:
    """Tokens of the pairs as two rows [prompt][chosen] + [prompt][rejected], whatever the layout, so tokens/s
    compares the same work across impls (packing sends the prompt once)."""
    if "packed" in batch:
        lengths = batch["packed"]["lengths"]
        return int(2 * lengths[:, 0].sum() + lengths[:, 1:].sum())
    return int(batch["pairs"]["attention_mask"].sum())


def run_ours(a, cache: bool) -> dict:
    from mmalign.core.config import Experiment, TrainConfig
    from mmalign.core.trainer import train
    from mmalign.datasets.vl_records import write_vl_pairs_jsonl
    from mmalign.mllm.dpo import DPOObjective, MLLMDPO, VLDPOConfig, VLPairDataConfig
    from mmalign.mllm.models import VLModelConfig

    clock, times = Clock(a), {}

    class Timed(MLLMDPO):  # the method itself, with timers around set-up and a clock in collate
        def build(self, device):
            if device.type != torch.device(a.device).type:
                raise SystemExit(f"the trainer chose {device}, not --device {a.device} (CUDA_VISIBLE_DEVICES?)")
            t0 = time.perf_counter()
            policy = super().build(device)
            times["load_s"] = time.perf_counter() - t0
            return policy

        def dataset(self):
            t0 = time.perf_counter()
            data, report = super().dataset()
            times["dataset_s"] = time.perf_counter() - t0
            times["dataset_tokens"] = sum(len(r.chosen.ids) + len(r.rejected.ids) for r in data.rows)
            return data, report

        def _reference_cache(self, rows):
            t0 = time.perf_counter()
            out = super()._reference_cache(rows)
            times["ref_precompute_s"] = time.perf_counter() - t0
            return out

        def loss(self, policy, batch):
            self.steps_done = getattr(self, "steps_done", 0) + 1  # grad_accum 1: one loss per optimizer step
            return super().loss(policy, batch)

        def collate(self, rows):
            clock.tick(self.policy, getattr(self, "steps_done", 0))
            batch = super().collate(rows)
            clock.count(pair_tokens(batch))
            return batch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = write_vl_pairs_jsonl(tmp / "data", shapeworld_rows(a.pairs))
        write_s = time.perf_counter() - t0
        cfg = VLDPOConfig(model=VLModelConfig(pretrained=a.model, dtype=a.dtype, lora_rank=a.lora_rank,
                                              reference="cache" if cache else "adapters_off"),
                          data=VLPairDataConfig(path=str(data), ref_cache_dir=str(tmp / "refcache")),
                          objective=DPOObjective(beta=a.beta))
        method = Timed(cfg, str(tmp / "run"))
        exp = Experiment(method="mllm_dpo", output_dir=str(tmp / "run"), args=cfg, train=TrainConfig(
            lr=a.lr, max_steps=clock.total, batch_size=a.batch, lr_scheduler="constant", max_grad_norm=1.0,
            seed=0, resume="never", keep_last=1, log_every=10))
        train(exp, method)
        trainable = sum(p.numel() for p in method.policy.parameters() if p.requires_grad)
    ref = times.pop("ref_precompute_s", 0.0)
    return {**clock.result(), "load_s": times["load_s"], "data_write_s": write_s,
            "encode_s": times["dataset_s"] - ref, "ref_precompute_s": ref,
            "setup_s": times["load_s"] + times["dataset_s"], "dataset_tokens": times["dataset_tokens"],
            "trainable_params": trainable}


def run_trl(a, gc: bool) -> dict:
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from mmalign.mllm.models import VLModelConfig, load_vlm, prepare_trainable

    clock = Clock(a)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        set_seed(0)
        model, processor = load_vlm(a.model, a.dtype)
        # Our LoraConfig, taken from prepare_trainable and unloaded again: TRL makes the adapter itself, so its
        # reference is the base model (a PeftModel handed over would get a "ref" adapter copy instead).
        wrapped = prepare_trainable(model, VLModelConfig(pretrained=a.model, dtype=a.dtype, lora_rank=a.lora_rank))
        lora = copy.deepcopy(wrapped.peft_config["default"])
        model = wrapped.unload()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset = Dataset.from_list(trl_rows(shapeworld_rows(a.pairs)))
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        set_seed(0)  # as our trainer before the adapter is made
        cfg = DPOConfig(output_dir=tmp, per_device_train_batch_size=a.batch, max_steps=clock.total, learning_rate=a.lr,
                        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
                        beta=a.beta, loss_type=["sigmoid"], bf16=False, fp16=False, use_cpu=a.device == "cpu",
                        report_to=[], max_length=None, dataloader_num_workers=0, save_strategy="no",
                        gradient_checkpointing=gc, logging_steps=10, seed=0)
        trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=dataset, processing_class=processor,
                             peft_config=lora)
        assert "ref" not in trainer.model.peft_config  # the reference is adapters off
        init_s = time.perf_counter() - t0
        collator = time_collator(trainer, clock)
        trainer.train()
        res = clock.result()
        tokens = sum(int(collator([dataset[j] for j in range(i, min(i + a.batch, len(dataset)))])
                         ["attention_mask"].sum()) for i in range(0, len(dataset), a.batch))
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {**res, "load_s": load_s, "data_write_s": write_s, "encode_s": 0.0, "ref_precompute_s": 0.0,
            "trainer_init_s": init_s, "setup_s": load_s + init_s, "dataset_tokens": tokens,
            "trainable_params": trainable}


def run_one(a) -> dict:
    import peft  # noqa: F401  imported before any timer on both sides (TRL imports it with trl)
    import transformers.models.llava  # noqa: F401

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model is None:
            a.model = str(Path(tmp) / "model")
            build_model(a.shape, Path(a.model), a.dtype, a.device)
        res = (run_ours(a, a.impl == "ours-cache") if a.impl.startswith("ours") else run_trl(a, a.impl == "trl-gc"))
    return {"impl": a.impl, "shape": a.shape, "device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(),
            "pairs": a.pairs, "batch": a.batch, "warmup": a.warmup, "steps": a.steps, "lora_rank": a.lora_rank, **res}


# ---- side by side ----

def side_by_side(a, argv: list[str]) -> dict:
    """Each impl in a fresh process with the same arguments (one model directory built here), alternating for
    --rounds; medians per impl and ratios against trl."""
    impls = a.impls.split(",")
    if "trl" not in impls or not set(impls) <= set(IMPLS):
        raise SystemExit(f"--impls: comma-separated from {', '.join(IMPLS)}, trl included")
    base = strip_args(argv, ("--rounds", "--impl", "--model", "--profile", "--impls"), ("--side-by-side",))
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    runs = {i: [] for i in impls}
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            model = str(Path(tmp) / "model")
            t0 = time.perf_counter()
            sizes = build_model(a.shape, Path(model), a.dtype, a.device)
            print(json.dumps({**sizes, "build_s": round(time.perf_counter() - t0, 1)}), file=sys.stderr)
        for _ in range(a.rounds):
            for impl in impls:
                r = run_json([sys.executable, __file__, *base, "--impl", impl, "--model", model], env=env, cwd=ROOT)
                runs[impl].append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    keys = ("tokens_per_s", "cpu_tokens_per_s", "steps_per_s", "step_s", "peak_mem_bytes", "peak_mem_steps_bytes",
            "setup_s", "encode_s", "ref_precompute_s", "load_s")
    med = {i: medians(rs, keys) for i, rs in runs.items()}
    trl = med["trl"]
    summary = {"shape": a.shape, "device": a.device, "dtype": a.dtype, "threads": a.threads, "pairs": a.pairs,
               "batch": a.batch, "warmup": a.warmup, "steps": a.steps, "rounds": a.rounds,
               "same_dataset_tokens": len({r["dataset_tokens"] for rs in runs.values() for r in rs}) == 1,
               "same_lora_init": len({round(r["lora_init_checksum"], 6) for rs in runs.values() for r in rs}) == 1,
               "medians": med, "all_tokens_per_s": {i: [r["tokens_per_s"] for r in rs] for i, rs in runs.items()}}
    for i in impls:
        if i != "trl":
            summary[f"{i}/trl"] = {"tokens_per_s": med[i]["tokens_per_s"] / trl["tokens_per_s"],
                                   "cpu_tokens_per_s": med[i]["cpu_tokens_per_s"] / trl["cpu_tokens_per_s"],
                                   "peak_mem": med[i]["peak_mem_bytes"] / trl["peak_mem_bytes"],
                                   "peak_mem_steps": med[i]["peak_mem_steps_bytes"] / trl["peak_mem_steps_bytes"]}
    print(f"\n{'impl':<11}{'tokens/s':>10}{'steps/s':>9}{'peak MiB':>9}{'setup s':>9}{'x tok/s':>9}{'x cpu':>7}"
          f"{'x mem':>7}", file=sys.stderr)
    for i in impls:
        m, x = med[i], summary.get(f"{i}/trl", {"tokens_per_s": 1.0, "cpu_tokens_per_s": 1.0, "peak_mem": 1.0})
        print(f"{i:<11}{m['tokens_per_s']:>10.1f}{m['steps_per_s']:>9.3f}{m['peak_mem_bytes'] / 2**20:>9.0f}"
              f"{m['setup_s']:>9.2f}{x['tokens_per_s']:>9.2f}{x['cpu_tokens_per_s']:>7.2f}{x['peak_mem']:>7.2f}",
              file=sys.stderr)
    return summary


def main():
    a = args()
    a.pairs = a.pairs or max(64, a.batch * (a.warmup + a.steps + 2))
    if a.meta:
        print(json.dumps(build_model(a.shape, None)))
    elif a.side_by_side:
        print(json.dumps(side_by_side(a, sys.argv[1:])))
    else:
        print(json.dumps(run_one(a)))


if __name__ == "__main__":
    main()
