"""SFT stage: LoRA (peft) on demonstrations with TRL's SFTTrainer; loss on response tokens only.

Entry: `train_sft(cfg, model_cfg, base_path, data_dir, out_dir)` -> SFTResult (paths + metrics).
Held-out loss/perplexity before and after; checkpoints every `save_steps` and resumes from the
last complete one when restarted with the same config and out_dir (a checkpoint a kill left half
written is removed, not resumed from). Output: the adapter and the adapter merged into the base (the
SFT model that the reward model and PPO start from); `out_dir/COMPLETE.json` once both are written
(`checkpoint.is_complete(out_dir)`).

Data parallel (`infra.num_processes` > 1): the trainer is accelerate's, so launched as N processes it runs DDP
(gloo on CPU, nccl on GPU; FSDP or DeepSpeed through an accelerate config file, `infra.accelerate_config`).
`sft.batch_size` stays the global batch (accelerate splits each batch between the ranks); rank 0 alone writes the
outputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config import ModelConfig, SFTConfig
from components.data.readers import read_demonstrations
from components.models import chat
from components.models.loading import is_quantized, load_causal_lm, load_tokenizer, resolve_device
from components.models.roles import lora_config
from components.training import checkpoint, distributed
from components.training.callbacks import CheckpointCompleteCallback, MlflowNamespaceCallback, log_to_active_run


@dataclass
class SFTResult:
    adapter_dir: str
    merged_dir: str
    metrics: dict[str, float]


def train_sft(
    cfg: SFTConfig, model_cfg: ModelConfig, base_path: str, data_dir: Path, out_dir: Path, seed: int = 0
) -> SFTResult:
    """LoRA SFT of the model at `base_path` on the demonstrations under `data_dir`, resuming from the
    last complete checkpoint under `out_dir/checkpoints`; writes the adapter and the merged model."""
    w = distributed.world()
    ckpt_dir = out_dir / "checkpoints"
    if w.main:  # rank 0 alone writes
        checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
        checkpoint.last_complete_checkpoint(ckpt_dir)  # removes what a kill left half written, before any rank looks
    distributed.barrier()
    distributed.per_rank(cfg.batch_size, "sft.batch_size", w)  # each rank an equal share of every batch
    train, evals = read_demonstrations(data_dir, cfg.eval_fraction)
    if not train or not evals:
        raise ValueError(f"SFT needs demonstrations for training and held-out eval under {data_dir}/demonstrations")
    tok = load_tokenizer(base_path, model_cfg, padding_side="right")
    if chat.uses_template(tok):  # TRL renders messages with the tokenizer's template, as PPO and serving render prompts
        train, evals = [chat.conversation(x) for x in train], [chat.conversation(x) for x in evals]
    model = load_causal_lm(base_path, model_cfg)
    trainer = build_trainer(cfg, model_cfg, model, tok, train, evals, ckpt_dir, seed)
    before = trainer.evaluate()["eval_loss"]
    # evaluate() prepared the model for evaluation and accelerate marked it prepared, so train() would not wrap it in
    # DistributedDataParallel: the ranks would step unsynchronised replicas (transformers 5.23, accelerate 1.15;
    # `check_replicas` below catches it). Unmarked, train() wraps it.
    trainer.model._is_accelerate_prepared = False
    last = checkpoint.last_complete_checkpoint(ckpt_dir)  # HF's get_last_checkpoint would take a partial one
    resume = str(last) if last else None
    out = trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()["eval_loss"]

    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    metrics = {
        "sft/eval_loss_base": before,
        "sft/eval_loss": after,
        "sft/eval_perplexity_base": math.exp(before),
        "sft/eval_perplexity": math.exp(after),
        "sft/train_loss": out.training_loss,
        "sft/resumed_from_step": float(int(resume.rsplit("-", 1)[-1]) if resume else 0),
        "sft/train_examples": float(len(train)),
        "sft/eval_examples": float(len(evals)),
        "sft/train_seconds": out.metrics["train_runtime"],
        # tokens/s of this process's steps only (a resumed run's token count includes earlier ones)
        "sft/tokens_per_second": trainer.state.num_input_tokens_seen / out.metrics["train_runtime"]
        if not resume
        else float("nan"),
        "sft/world_size": float(w.size),
    }
    distributed.check_replicas([p for p in trainer.model.parameters() if p.requires_grad], "SFT")
    if not w.main:
        return SFTResult(str(adapter_dir), str(merged_dir), metrics)
    save_outputs(trainer, tok, out_dir, base_path, model_cfg)
    log_to_active_run(metrics, cfg.max_steps)
    checkpoint.mark_complete(out_dir, {"stage": "sft", "outputs": ["adapter", "merged"], "metrics": metrics})
    return SFTResult(str(adapter_dir), str(merged_dir), metrics)


def build_trainer(
    cfg: SFTConfig, model_cfg: ModelConfig, model, tok, train: list[dict], evals: list[dict], ckpt_dir: Path, seed: int
):
    """TRL's SFTTrainer: LoRA from `cfg.lora`, loss on completion tokens only, cosine LR, checkpoints
    every `save_steps` under `ckpt_dir`, no eval during training (the stage evaluates before and after)."""
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    checkpointing: dict[str, Any] = {
        "activation_checkpointing": model_cfg.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if model_cfg.gradient_checkpointing else None,
    }
    if "activation_checkpointing" not in {f.name for f in dataclasses.fields(TrlSFTConfig)}:
        # transformers before 5.2x names it gradient_checkpointing (the GPU machine's 5.17 does)
        checkpointing = {k.replace("activation", "gradient"): v for k, v in checkpointing.items()}
    args = TrlSFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.max_steps,
        # the global batch: with several processes accelerate splits each batch between them (split_batches), so
        # they see the examples one process would, and the loss is averaged over all their tokens
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        accelerator_config={"split_batches": True},
        ddp_find_unused_parameters=False,  # every LoRA weight is in every forward: no extra graph traversal
        average_tokens_across_devices=True,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, cfg.max_steps // 10),
        max_length=cfg.max_length,
        completion_only_loss=True,
        logging_steps=max(1, cfg.max_steps // 20),
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=resolve_device(model_cfg.device).type == "cpu",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        **checkpointing,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evals),
        processing_class=tok,
        peft_config=lora_config(cfg.lora),
        callbacks=[MlflowNamespaceCallback("sft"), CheckpointCompleteCallback()],
    )


def save_outputs(trainer, tok, out_dir: Path, base_path: str, model_cfg: ModelConfig) -> tuple[Path, Path]:
    """Save the trained adapter and the adapter merged into the base (each with the tokenizer):
    -> (out_dir/adapter, out_dir/merged)."""
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
    tok.save_pretrained(adapter_dir)
    if is_quantized(trainer.model):  # QLoRA: merged into the base in model.dtype, not into its 4/8-bit weights
        from peft import PeftModel

        full = load_causal_lm(base_path, model_cfg, torch.device("cpu"), quantize=False)
        merged = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    else:
        merged = trainer.model.merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)
    return adapter_dir, merged_dir
