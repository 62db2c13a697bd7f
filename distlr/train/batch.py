"""From a batch to a loss: moving batches to the device and finding the loss of any model.

A batch may be an ``(inputs, targets)`` tuple/list, a dict (Hugging Face style) or anything with
``.to()``. Without a criterion the model computes the loss (``LOSS_CONVENTIONS`` says where it is
looked for). A causal LM whose batch has no ``labels`` gets labels made
from ``input_ids`` with padding masked to -100.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Criterion = Callable[[Any, Any], torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss``: the whole loss of one micro-batch, forward included."""
IGNORE_INDEX = -100  # the label value Hugging Face and nn.CrossEntropyLoss skip


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def is_causal_lm(model: nn.Module) -> bool:
    """True for Hugging Face causal language models (``*ForCausalLM`` / ``*LMHeadModel``)."""
    model = unwrap(model)
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP/FSDP/DeepSpeed wrapper (``.module``), or the model itself."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def add_causal_lm_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Labels for a causal LM batch without them: ``input_ids`` with padding set to -100."""
    if "input_ids" not in batch:
        raise ValueError(
            f"a causal LM batch without 'labels' needs 'input_ids' to build them; got keys {sorted(batch)}"
        )
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return {**batch, "labels": labels}


def prepare_batch(batch: Any, device: torch.device, *, causal_lm: bool, has_criterion: bool) -> Any:
    """Move a batch to ``device`` and, for a causal LM without a criterion, add its labels.

    A dict batch whose values are lists (a ``datasets`` dataset without ``set_format("torch")``)
    gets tensors made from them, or an error saying what to do.
    """
    if isinstance(batch, Mapping):
        batch = {k: _tensor_from_lists(k, v) for k, v in batch.items()}
    batch = to_device(batch, device)
    if causal_lm and not has_criterion and isinstance(batch, Mapping) and "labels" not in batch:
        batch = add_causal_lm_labels(batch)
    return batch


def _tensor_from_lists(key: str, value: Any) -> Any:
    """A tensor for the lists a ``datasets`` dataset yields without a torch format.

    torch's default collate turns a batch of rows of equal length into a list with one tensor per
    position (each of the batch's size): stacked along dim 1, that is the (batch, length) tensor.
    A list of equal-length lists of numbers becomes the tensor it describes. Anything else stays.

    Raises:
        TypeError: rows of different lengths, which no tensor holds: pad them, or let the
            dataset yield tensors.
    """
    if not isinstance(value, list) or not value:
        return value
    if all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in value):
        if len({v.shape for v in value}) == 1:
            return torch.stack(value, dim=1)
    elif all(isinstance(v, (list, tuple)) for v in value):
        if len({len(v) for v in value}) > 1:
            raise TypeError(f"batch[{key!r}] holds rows of different lengths ({sorted({len(v) for v in value})}); pad "
                            "them to one length (a collate_fn, or dataset.set_format('torch') on padded rows)")
        try:
            return torch.tensor(value)
        except (TypeError, ValueError):
            return value
    return value


def cast_floating_inputs(batch: Any, dtype: torch.dtype, *, has_criterion: bool) -> Any:
    """Cast the floating-point model inputs of a batch to ``dtype`` (a bf16/fp16 engine's weights).

    Targets keep their precision: the criterion's ``targets`` and a dict's ``labels``.
    """
    if dtype == torch.float32:
        return batch

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(dtype) if value.is_floating_point() else value
        if isinstance(value, Mapping):
            return {k: v if k == "labels" else cast(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        return value

    if has_criterion and isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return type(batch)([*(cast(v) for v in batch[:-1]), batch[-1]])
    return cast(batch)


def count_items(batch: Any, *, causal_lm: bool) -> int | torch.Tensor:
    """How many things this batch's loss is a mean over: label tokens for LMs (a tensor on the
    batch's device), else samples (an int from the shape).

    Used to weight losses when batches differ in size (accumulation, ranks, the last batch),
    so the recorded loss is the mean over every item, not the mean of per-batch means.
    """
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
        labels = batch["labels"]
        if labels.dim() >= 2 and not labels.is_floating_point():
            # A causal LM predicts token t+1 from t, so the first label of each row is never scored.
            # Counted on the device: reading the count here would be a host sync per micro-batch.
            scored = labels[..., 1:] if causal_lm else labels
            return (scored != IGNORE_INDEX).sum()
        return int(labels.shape[0]) if labels.dim() else 1
    return count_samples(batch)


def count_samples(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (1 if it has none)."""
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        return 1
    return int(first.shape[0])


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def compute_loss(model: nn.Module, batch: Any, criterion: Criterion | None,
                 loss_fn: LossFn | None = None) -> torch.Tensor:
    """Run the forward pass and return the scalar loss of one (micro-)batch (``loss_fn(model,
    batch)`` when one is given: it runs the forward itself).

    Raises:
        TypeError: the batch or the model output has no loss distlr can find; the message says
            what to pass instead.
    """
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif criterion is not None:
        inputs, targets = split_inputs_targets(batch)
        output = _call(model, inputs)
        if not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
            raise TypeError(
                f"criterion=... was given, but the model returned a {type(output).__name__}, not a tensor; pass "
                "criterion=None to use the model's own loss (with 'labels' in the batch), or wrap the model so "
                "that it returns output.logits"
            )
        loss = criterion(output, targets)
    else:
        output = _call(model, batch)
        has_labels = isinstance(batch, Mapping) and "labels" in batch
        loss = loss_from_output(output, has_labels=has_labels)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(
            f"the loss must be a scalar tensor, got {shape}; reduce it to a mean "
            "(e.g. reduction='mean' in the criterion)"
        )
    return loss.reshape(())


def split_inputs_targets(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, for use with a criterion."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                f"with a criterion, a dict batch needs a 'labels' key for the targets; got keys {sorted(batch)}"
            )
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return rest, batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
        return inputs, batch[-1]
    raise TypeError(
        f"with a criterion, a batch must be an (inputs, targets) tuple/list or a dict with 'labels'; "
        f"got {type(batch).__name__}"
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if _positional(inputs):
        return model(*inputs)
    return model(inputs)


def _positional(inputs: Any) -> bool:
    """Inputs given to ``forward`` as several positional arguments: a tuple, or a list of
    tensors. A list of anything else (strings, numbers) is one argument."""
    if isinstance(inputs, tuple):
        return True
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(v, (torch.Tensor, Mapping)) for v in inputs)


def check_batch_fits(model: nn.Module, batch: Any, criterion: Criterion | None) -> None:
    """Check once, on the first batch, that the model can take it as distlr will pass it.

    Without this, an ``(inputs, targets)`` batch and no criterion ends in a bare "forward()
    takes 2 positional arguments but 3 were given" from deep inside the model.

    Raises:
        TypeError: the batch has more elements than ``forward`` takes, saying what to pass.
    """
    inputs = split_inputs_targets(batch)[0] if criterion is not None else batch
    if _positional(inputs):
        _check_arity(model, len(inputs))


def _check_arity(model: nn.Module, given: int) -> None:
    try:
        params = inspect.signature(unwrap(model).forward).parameters.values()
    except (TypeError, ValueError):
        return
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return
    takes = sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)
    if given > takes:
        raise TypeError(
            f"the batch has {given} elements but {type(unwrap(model)).__name__}.forward takes {takes} "
            "positional argument(s); for (inputs, targets) batches pass criterion=... "
            "(e.g. torch.nn.CrossEntropyLoss()), or make forward(inputs, targets) return the loss"
        )


LOSS_CONVENTIONS = ("output.loss (Hugging Face), output['loss'], a scalar tensor, or the one scalar tensor of a "
                    "tuple: (loss, logits, ...) of Hugging Face's return_dict=False or (logits, loss) of nanoGPT")
"""Where ``loss_from_output`` looks for the loss, in that order (the messages and docs/api.md say it)."""


def loss_from_output(output: Any, *, has_labels: bool = False) -> torch.Tensor:
    """The loss a model returned, looked for as ``LOSS_CONVENTIONS`` says.

    Raises:
        TypeError: no loss there, or a tuple holding several scalar tensors (which one is the
            loss cannot be told); the message names the conventions.
    """
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.numel() == 1:
        loss = output
    if loss is None and isinstance(output, (tuple, list)):
        scalars = [i for i, v in enumerate(output) if isinstance(v, torch.Tensor) and v.dim() == 0]
        if len(scalars) > 1:
            raise TypeError(f"the model returned a {type(output).__name__} with {len(scalars)} scalar tensors (at "
                            f"positions {scalars}), so which one is the loss cannot be told; return one of "
                            f"{LOSS_CONVENTIONS}, or pass loss_fn=lambda model, batch: ... that picks it")
        if scalars:
            loss = output[scalars[0]]
    if loss is None:
        what = type(output).__name__
        if isinstance(output, torch.Tensor):
            what += f" of shape {tuple(output.shape)}"
        elif isinstance(output, (tuple, list)):
            what += f" of {len(output)} elements, none a scalar tensor"
        labels = ("the batch has 'labels', but the model returned no loss for them" if has_labels
                  else "include 'labels' in a Hugging Face batch")
        raise TypeError(
            f"cannot find a loss in the model output ({what}); distlr looks for {LOSS_CONVENTIONS}. Pass "
            f"criterion=... (e.g. torch.nn.CrossEntropyLoss()) with (inputs, targets) batches, {labels}, or make "
            "the model return its loss"
        )
    return loss
