"""How a model's weights are stored on disk: dense, sparse (bitmask + values), per-channel int8
and fp16, all inside plain safetensors files, and back to dense float tensors.

``config["storage"]`` says which layout model.safetensors uses; the file stays plain safetensors
and self-describing (suffixed keys), and loads back to dense float tensors:

- ``"sparse": [names]``: a bitmask (``np.packbits``) and the non-zero values, as
  ``name:mask`` and ``name:values``;
- ``"int8": {name: output-channel axis}``: per-channel symmetric int8, as ``name:int8`` and
  ``name:scale`` (the scale shaped to broadcast over the weight, so the axis is implicit);
- ``"half": true``: every other float tensor as float16.
"""

from __future__ import annotations

import numpy as np
import torch


def encode_state(state: dict[str, torch.Tensor], storage: dict | None) -> dict[str, torch.Tensor]:
    """Dense ``state`` -> the tensors written to disk under ``storage`` (see above)."""
    storage = storage or {}
    int8, sparse = dict(storage.get("int8", {})), set(storage.get("sparse", ()))
    out: dict[str, torch.Tensor] = {}
    for name, v in state.items():
        v = v.detach().cpu()
        if name in int8:
            q, scale = quantize_int8(v, axis=int(int8[name]))
            out[f"{name}:int8"], out[f"{name}:scale"] = q, scale
        elif storage.get("half") and v.is_floating_point():
            out[name] = v.half()
        else:
            out[name] = v
    for key in list(out):
        if key.split(":")[0] in sparse and not key.endswith(":scale"):
            v = out.pop(key)
            mask = (v != 0).flatten().numpy()
            out[f"{key}:mask"] = torch.from_numpy(np.packbits(mask))
            out[f"{key}:values"] = v.flatten()[torch.from_numpy(mask)].clone()
    return out


def decode_state(tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size]
                 ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`: the stored tensors -> dense float tensors, given the
    model's ``shapes`` (sparse tensors store no shape of their own)."""
    out = dict(tensors)
    for key in [k for k in out if k.endswith(":values")]:
        base = key[: -len(":values")]
        bits = out.pop(f"{base}:mask", None)
        shape = shapes.get(base.split(":")[0])
        if bits is None or shape is None:
            raise ValueError(f"sparse tensor {base} lacks its mask or is not in the model")
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=shape.numel()).astype(bool))
        values = out.pop(key)
        dense = torch.zeros(shape.numel(), dtype=values.dtype)
        if int(mask.sum()) != values.numel():
            raise ValueError(f"sparse tensor {base}: mask has {int(mask.sum())} entries, "
                             f"values {values.numel()}")
        dense[mask] = values
        out[base] = dense.view(shape)
    for key in [k for k in out if k.endswith(":int8")]:
        base = key[: -len(":int8")]
        out[base] = out.pop(key).float() * out.pop(f"{base}:scale")
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def quantize_int8(w: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 of a weight, with PyTorch's observer choosing the
    scales: ``w ~= q * scale``; ``q`` int8 of ``w``'s shape, ``scale`` broadcastable to it."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    obs = PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.qint8,
                                   qscheme=torch.per_channel_symmetric)
    obs(w.float())
    scale, _ = obs.calculate_qparams()
    shape = [1] * w.dim()
    shape[axis] = -1
    scale = scale.float().view(shape)
    q = torch.clamp(torch.round(w.float() / scale), obs.quant_min, obs.quant_max)
    return q.to(torch.int8), scale
