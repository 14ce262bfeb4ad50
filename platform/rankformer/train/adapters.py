"""LoRA adapters for fine-tuning (``--peft lora``), with Hugging Face PEFT: low-rank updates on the
encoder's ``lora_targets`` (attention projections by default) and the classification head trained
whole; every base weight stays frozen, bit for bit. Optionally the frozen base in 8 or 4 bits
(bitsandbytes, CUDA only), as the reference offers for its quantized models.

A saved adapter model is the adapters, the head, the classifier's config and a reference to its
base model (a path, or a registry version, pinned, with the vocabulary hash); rankformer's loader
rebuilds the classifier on the base and puts the adapters on it (:func:`load_adapters`).
``--merge`` saves the adapters merged into a plain Hugging Face model instead.
"""

from __future__ import annotations

from typing import Any

import torch

from rankformer.config.train import AdapterOptions
from rankformer.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: its presence marks an adapter model folder


def quantization(opts: AdapterOptions) -> dict[str, Any]:
    """``from_pretrained`` keywords for a quantized frozen base (none without --quantize)."""
    if opts.quantize == "none":
        return {}
    if not torch.cuda.is_available():
        raise InputError(
            f"quantize {opts.quantize}: no CUDA GPU here; quantized base weights need one (bitsandbytes)"
        )
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise InputError(f"quantize {opts.quantize} needs transformers' BitsAndBytesConfig ({exc})") from exc
    four = opts.quantize == "4bit"
    config = BitsAndBytesConfig(
        load_in_4bit=four,
        load_in_8bit=not four,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_type="nf4",
    )
    return {"quantization_config": config, "device_map": {"": 0}}


def head_modules(model: torch.nn.Module) -> list[str]:
    """The classifier's own layers with weights (beside the encoder; a task's head inside a list
    of heads by its index): trained whole, saved with the adapters."""
    out = []
    for name, child in model.named_children():
        if name in ("bert", "encoder") or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, torch.nn.ModuleList | torch.nn.ModuleDict):
            out += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            out.append(name)
    return out


def with_lora(model: torch.nn.Module, opts: AdapterOptions) -> torch.nn.Module:
    """``model`` with LoRA adapters on its encoder (the base frozen) and its head trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if opts.quantize != "none":
        model = prepare_model_for_kbit_training(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in opts.lora_targets if t not in names]
    if missing:
        raise InputError(
            f"lora_targets {missing}: no such module in the model; BERT's are query, key, value, dense"
        )
    config = LoraConfig(
        r=opts.lora_rank,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=list(opts.lora_targets),
        modules_to_save=head_modules(model),
        bias="none",
    )
    return get_peft_model(model, config)


def is_adapted(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model with the adapters folded into its weights (the model itself when it has none)."""
    if not is_adapted(model):
        return model
    return model.merge_and_unload()  # type: ignore[operator]


def adapter_meta(
    opts: AdapterOptions, base_model: str, base_vocab_hash: str, tracking_uri: str
) -> dict[str, Any]:
    """What a saved model records of its adapters: the method and settings, and its base model
    (a registry alias pinned to the version it names now)."""
    base = base_model
    if base_model.startswith("models:/") and "@" in base_model:
        from rankformer import tracking

        v = tracking.model_version_info(tracking_uri, base_model)
        base = f"models:/{v['name']}/{v['version']}"
    return {
        "method": opts.peft,
        "merged": bool(opts.merge),
        "lora_rank": opts.lora_rank,
        "lora_alpha": opts.lora_alpha,
        "lora_dropout": opts.lora_dropout,
        "lora_targets": list(opts.lora_targets),
        "quantize": opts.quantize,
        "base_model": base,
        "base_vocab_hash": base_vocab_hash,
    }


def counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": int(trainable), "total_parameters": int(total)}
