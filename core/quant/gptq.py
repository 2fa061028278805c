"""GPTQ (Frantar et al., 2022): quantize a layer's weight columns one at a time, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ||WX - QX||^2, whose Hessian is H = 2 X X^T over calibration inputs X.

Per layer:
1. H = 2/n sum x x^T over the calibration activations entering the layer (accumulated by a hook);
   dead inputs (H_ii = 0) get H_ii = 1 and a zero weight column; H += damp * mean(diag H) * I.
2. U = upper Cholesky factor of H^-1 (so row i of U, scaled by 1/U_ii, is the update direction for
   column i given that columns < i are fixed: the "Cholesky of the inverse" reformulation).
3. Columns in blocks of `block_size`: inside a block, column i is quantized, its error
   e = (w_i - q_i) / U_ii is subtracted from the block's later columns as e * U_i,i+1:; after the block the
   accumulated errors update every later column at once (lazy batch update).
4. Group-wise INT4 computes each group's (scale, zero) when the sweep reaches the group's first column,
   from the weights *as updated so far*, as in the reference implementation. INT8 is per row: the scale
   comes from the original row.

Layers are processed block by block in depth order; each block's calibration inputs are produced by the
blocks before it *already quantized*, so later layers compensate the errors of earlier ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from glm_cli.core.console import log
from glm_cli.core.errors import GlmError
from glm_cli.core.quant.weight_only import (
    INT8_MAX,
    QuantScheme,
    finish,
    group_size_for,
    install,
    int4_scale_zero,
    int8_scales,
    pack_int4,
    quantize_int4_column,
    targets_for,
)


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128,
                         damp: float = 0.01, block_size: int = 128) -> dict[str, torch.Tensor]:
    """GPTQ-quantize weight (N, K) given H (K, K); returns the same tensors as `quantize_weight`."""
    W = weight.detach().float().clone()
    n, k = W.shape
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:
        raise GlmError("GPTQ: the calibration Hessian is not positive definite even after dampening; "
                       "use more calibration samples or a larger dampening") from None

    if bits == 8:
        g = k
        scales8 = int8_scales(W)
        s_row = scales8.float()
    else:
        g = group_size_for(k, group_size)
        scales = torch.zeros(n, k // g, dtype=torch.float16)
        zeros = torch.zeros(n, k // g)
    block = max(block_size // g, 1) * g if bits == 4 else block_size  # whole groups per block
    codes = torch.zeros(n, k)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            d = U1[i, i]
            if bits == 8:
                q = torch.round(w / s_row).clamp(-INT8_MAX, INT8_MAX)
                wq = q * s_row
            else:
                if col % g == 0:
                    s, z = int4_scale_zero(W1[:, i:i + g])
                    scales[:, col // g], zeros[:, col // g] = s, z
                    s_cur, z_cur = s.float(), z
                q = quantize_int4_column(w, s_cur, z_cur)
                wq = (q - z_cur) * s_cur
            codes[:, col] = q
            err = (w - wq) / d
            W1[:, i + 1:] -= err[:, None] * U1[i, i + 1:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    if bits == 8:
        return {"qweight": codes.to(torch.int8), "scales": scales8}
    return {"qweight": pack_int4(codes.to(torch.uint8)), "scales": scales, "qzeros": zeros.to(torch.uint8)}


class HessianAccumulator:
    """Running H = 2/n sum x x^T of the inputs a Linear sees (hooked on its forward)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features)
        self.count = 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        m = x.shape[0]
        self.H *= self.count / (self.count + m)
        self.count += m
        x = x * (2.0 / self.count) ** 0.5
        self.H += x.T @ x


class _StopForward(Exception):
    pass


def _first_block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """The arguments the first block receives for each calibration batch (embeddings, rotary tables,
    mask), captured by running the model only that far."""
    captured = []

    def grab(module, args):
        captured.append(args)
        raise _StopForward

    hook = model.model.layers[0].register_forward_pre_hook(grab)
    try:
        for batch in batches:
            try:
                model(batch)
            except _StopForward:
                pass
    finally:
        hook.remove()
    return captured


def _hessians(module: nn.Module, names: list[str], run) -> dict[str, HessianAccumulator]:
    """H of the inputs each named Linear of `module` sees while `run()` runs."""
    accs, hooks = {}, []
    for name in names:
        linear = module.get_submodule(name)
        accs[name] = HessianAccumulator(linear.in_features)
        hooks.append(linear.register_forward_hook(accs[name]))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return accs


@torch.no_grad()
def quantize_model_gptq(model: nn.Module, scheme: QuantScheme, batches: list[torch.Tensor]) -> nn.Module:
    """GPTQ every target layer of `model` in place with calibration `batches` (each (B, T) token ids).

    Block by block, as GPTQ prescribes: a block's layers are quantized with the Hessian of the inputs it
    receives from the blocks already quantized before it. Each block's calibration inputs are kept and
    the block's (quantized) outputs become the next block's, so every block runs twice in all, not once
    per later block (re-running the model from the embedding each time made a 30-layer model ~15x
    slower). The activations kept cost batches x tokens x width floats.
    """
    if not batches:
        raise GlmError("GPTQ needs calibration data (no calibration batches)")
    model.eval()
    targets = targets_for(model, scheme)
    inputs = _first_block_inputs(model, batches)
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        names = [t.removeprefix(prefix) for t in targets if t.startswith(prefix)]
        if names:
            accs = _hessians(block, names, lambda: [block(*args) for args in inputs])  # noqa: B023
            for name in names:
                _quantize_layer(model, prefix + name, accs[name].H, scheme)
            log(f"gptq: model.layers.{i} ({len(names)} layers) quantized")
        inputs = [(block(*args), *args[1:]) for args in inputs]
    if "lm_head" in targets:
        acc = HessianAccumulator(model.lm_head.in_features)
        for args in inputs:
            acc(None, (model.model.norm(args[0]),), None)
        _quantize_layer(model, "lm_head", acc.H, scheme)
        log("gptq: lm_head (1 layers) quantized")
    finish(model, scheme)
    return model


def _quantize_layer(model: nn.Module, name: str, hessian: torch.Tensor, scheme: QuantScheme) -> None:
    linear = model.get_submodule(name)
    bits = scheme.bits_for(name)
    tensors = gptq_quantize_weight(linear.weight, hessian, bits, scheme.group_size, scheme.damp,
                                   scheme.block_size)
    install(model, name, tensors, bits)
