"""dinofast inside transformers' DINOv3 ViT: in-place patching and a packed mixed-resolution forward.

Patching (`patch_dinov3`) swaps the classes of three kinds of submodules for dinofast subclasses; no
parameter, buffer or state-dict key changes, and `unpatch_dinov3` swaps the classes back:
  rope_embeddings (DINOv3ViTRopePositionEmbedding): instead of cos/sin tables its forward returns a
      `_BatchedPlan` (grid, rope frequencies, and in train mode the coordinate augmentation drawn
      exactly as transformers draws it: once per forward, same RNG calls in the same order).
  layer.i.attention (DINOv3ViTAttention): one fused q|k|v projection (its weight cached, keyed by
      the parameters' versions), dinofast's 2D RoPE on the q/k views of that buffer (in place when
      no gradient is needed), then attention; the attention maps on an explicit path when
      transformers would return them (output_attentions with the eager implementation).
  layer.i (DINOv3ViTLayer): the same block; on the CPU inference path (fp32, and bf16 where oneDNN
      runs it natively; no autograd, eval) every GEMM is one oneDNN call on weights cached in its
      packed layout, with the bias and the MLP activation in the epilogue and LayerScale (folded
      into the weights) + residual in the o_proj/down_proj epilogues (oneDNN post-ops), which is
      most of the CPU speed-up over transformers. Eager only: while torch.compile / torch.export
      trace, every layer takes the plain path (see dinofast._validate.tracing).
The encoder is transformers' own; it hands the plan to every layer unchanged.

`encode_packed` runs the same modules over one packed sequence of images of different sizes:
[CLS, registers, patches] per image back to back, no padding, varlen attention with fused RoPE.

Every attention call goes through `_attend_batched` (rope2d_ + SDPA: on CPU torch's flash SDPA is
at least as fast as the cpp varlen kernel on one long sequence, fp32 and bf16) or `_attend_packed`
(dinofast.varlen_attention), the only places that pick an attention implementation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinofast import _validate as V
from dinofast._backend import forced_backend, load_C, why_unavailable
from dinofast._layout import PackedLayout, int32_on
from dinofast.ops.rope2d import RopeSpec, rope2d, rope2d_
from dinofast.ops.varlen_attention import varlen_attention
from dinofast.reference.rope2d import inv_freq as default_inv_freq
from dinofast.reference.rope2d import sample_coord_transform


# ---------------------------------------------------------------------------------------------
# What the patched rope module hands every attention layer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BatchedPlan:
    """RoPE for a batch of same-size images [B, N, C], N = num_prefix_tokens + Hp*Wp."""

    hp: int
    wp: int
    theta: float
    periods: Optional[Tensor]  # [D/4] float32, None: transformers' default from theta
    coord_transform: Optional[Tensor]  # float32 [4] (train-mode augmentation), shared by the batch


@dataclass(frozen=True)
class _PackedPlan:
    """A packed sequence [T, C] of n images: cu_seqlens int32 [n+1], rope.grids int32 [n, 2] on the
    model's device, and their host copy `layout` (built once per forward; no layer reads the
    device tensors back)."""

    cu_seqlens: Tensor
    max_seqlen: int
    rope: RopeSpec
    layout: PackedLayout


def _transformers_dinov3():
    from transformers.models.dinov3_vit import modeling_dinov3_vit as m

    return m


def _patch_size(config) -> Tuple[int, int]:
    p = config.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))


def _stored_periods(rope_module) -> Tensor | None:
    """None when rope_module.inv_freq is transformers' default (the kernels then compute it from
    theta, bit for bit), else the periods 1/inv_freq (e.g. loaded from a checkpoint).
    Cached per inv_freq version so an eager forward costs no host sync. While a compiler traces,
    the value of inv_freq is unknown, so the periods are always 1/inv_freq (a node of the graph)."""
    inv = rope_module.inv_freq
    if V.tracing(inv):
        return 1.0 / inv.float()
    key = V.version_key(inv)
    cached = rope_module.__dict__.get("_dinofast_periods")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    default = default_inv_freq(rope_module.head_dim, rope_module.base, device=inv.device)
    # a normal tensor even when first made under inference_mode: the ops then keep its check and
    # inverse between calls (an inference tensor has no version counter, so they could not), and a
    # later training forward may save it for its backward
    with torch.inference_mode(False):
        periods = None if torch.equal(inv.float(), default) else (1.0 / inv.float()).contiguous()
    rope_module.__dict__["_dinofast_periods"] = (key, periods)
    return periods


def _coord_transform(config, n: int, device) -> Optional[Tensor]:
    """Train-mode coordinate augmentation [n, 4], drawn like transformers (None when none is set)."""
    shift, jitter, rescale = config.pos_embed_shift, config.pos_embed_jitter, config.pos_embed_rescale
    if shift is None and jitter is None and rescale is None:
        return None
    return sample_coord_transform(n, shift=shift, jitter=jitter, rescale=rescale, device=device)


# ---------------------------------------------------------------------------------------------
# Attention (the only place that picks an attention implementation)
# ---------------------------------------------------------------------------------------------
def _attend_batched(q: Tensor, k: Tensor, v: Tensor, plan: _BatchedPlan, num_prefix_tokens: int,
                    scale: float, dropout_p: float) -> Tensor:
    """q, k, v [B, H, N, D] (strided views of the qkv buffer) -> [B, H, N, D]."""
    rope = dict(num_prefix_tokens=num_prefix_tokens, theta=plan.theta, periods=plan.periods,
                coord_transform=plan.coord_transform)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q, k = rope2d(q, k, (plan.hp, plan.wp), **rope)
    else:  # q and k are views of a temporary: rotate them where they are
        rope2d_(q, k, (plan.hp, plan.wp), **rope)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _batched_through_cpp(x: Tensor, head_dim: int, dropout_p: float) -> bool:
    """Whether a batch of same-size images attends through varlen_attention (one segment per image)
    instead of SDPA, on a CPU where the cpp kernel beats torch's SDPA: bf16 where its forward runs on
    AMX tiles (1.2-1.7x torch's bf16 SDPA from 224 to 1024 px), fp32 where its gemms are its own
    AVX-512 kernels (1.16x torch's fp32 SDPA for one 768 px image with RoPE fused; 1.3x forward and
    backward on a 4-image mix; benchmarks/README.md). No dropout, no other backend forced.
    Compiled and exported models keep SDPA: the probe and the backend choice are not traceable."""
    if torch.compiler.is_compiling():  # first: the rest is not traceable
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or dropout_p != 0.0:
        return False
    if forced_backend() not in (None, "cpp") or why_unavailable("cpp", "cpu") is not None:
        return False
    name = "cpu_bf16_attention_on_amx" if x.dtype == torch.bfloat16 else "cpu_fp32_attention_own_kernels"
    probe = getattr(load_C(), name, None)  # absent from an older build
    return probe is not None and bool(probe(head_dim))


def _packed_twin(plan: _BatchedPlan, batch: int, num_prefix_tokens: int, device: torch.device) -> _PackedPlan:
    """The batch [B, N] as a packed sequence of B images of plan's grid (RoPE as in `plan`)."""
    grids = [(plan.hp, plan.wp)] * batch
    layout = PackedLayout.from_grids(grids, num_prefix_tokens)
    transform = None if plan.coord_transform is None else plan.coord_transform.expand(batch, 4)
    rope = RopeSpec(int32_on(grids, device), num_prefix_tokens, plan.theta, plan.periods, transform)
    return _PackedPlan(int32_on(layout.cu_seqlens, device), layout.max_seqlen, rope, layout)


def _attend_packed(q: Tensor, k: Tensor, v: Tensor, plan: _PackedPlan, scale: float) -> Tensor:
    """q, k, v [T, H, D] packed (strided views of the qkv buffer) -> [T, H, D]; each image attends
    only to itself, RoPE fused into the attention's Q/K loads. In CPU bf16 too: the cpp kernel
    multiplies on bf16 GEMMs where oneDNN packs them (AMX), faster on a mix of images than torch's
    bf16 SDPA image by image after rope2d_ (benchmarks/README.md)."""
    return varlen_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, softmax_scale=scale, rope=plan.rope,
                            layout=plan.layout)


class _FusedLinear(torch.autograd.Function):
    """y = x @ W.T + b with W, b the cached concatenation of several Linear layers' parameters,
    differentiable with respect to those layers' own parameters (the gradient of the
    concatenation is split back, as torch.cat's backward would): training reuses the fused weight
    instead of concatenating it on every call."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, *params):
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.has_bias = sizes, [p is not None for p in params[len(sizes):]]
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n = len(ctx.sizes)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_ws = (g2.t() @ x.reshape(-1, x.shape[-1])).split(ctx.sizes)
        grad_bs = g2.sum(0).split(ctx.sizes)
        grads = [gw if ctx.needs_input_grad[4 + i] else None for i, gw in enumerate(grad_ws)]
        grads += [gb if has and ctx.needs_input_grad[4 + n + i] else None
                  for i, (gb, has) in enumerate(zip(grad_bs, ctx.has_bias))]
        return (grad_x, None, None, None, *grads)


def _concat_qkv(projs) -> tuple[Tensor, Tensor | None]:
    weight = torch.cat([p.weight for p in projs])
    bias = None
    if any(p.bias is not None for p in projs):
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])
    return weight, bias


class _CacheSlot:
    """A value derived from parameters and the key it was built for (see _cached). Copies and
    pickles as empty (rebuilt on first use): oneDNN-packed tensors can be neither deep-copied nor
    pickled, and a copy would only carry derived tensors its own parameters do not match."""

    __slots__ = ("key", "value")

    def __init__(self, key=None, value=None):
        self.key, self.value = key, value

    def __deepcopy__(self, memo):
        return _CacheSlot()

    def __reduce__(self):
        return _CacheSlot, ()


def _cached(module: nn.Module, name: str, sources: Sequence[Tensor | None], build) -> tuple[object, bool]:
    """(build(), cached): a value derived from `sources` (parameters), kept detached in
    module.__dict__[name] and keyed by the identity and version counter of each source, so an
    optimizer step, an in-place edit, load_state_dict or .to() changes the key and the next call
    rebuilds it. Not kept (cached=False, build() called every time, differentiably) while a
    compiler traces (the graph gets the computation, which the compiler may constant-fold) or for
    inference tensors (no version counter)."""
    if V.tracing(sources[0]):
        return build(), False
    key = V.version_key(*sources)
    if key is None:
        return build(), False
    slot = module.__dict__.get(name)
    if slot is None or slot.key != key:
        with torch.no_grad():
            slot = _CacheSlot(key, build())
        module.__dict__[name] = slot
    return slot.value, True


def _fused_qkv(attn) -> tuple[Tensor, Tensor | None, bool]:
    """(weight [3C, C], bias [3C] or None, cached): q_proj | k_proj | v_proj concatenated, cached
    by _cached (3*C*C extra values per layer)."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    (weight, bias), cached = _cached(attn, "_dinofast_qkv", [*(p.weight for p in projs), *(p.bias for p in projs)],
                                     lambda: _concat_qkv(projs))
    return weight, bias, cached


def _qkv_projection(attn, hidden_states: Tensor, onednn: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """hidden_states [..., C] -> (q, k, v), each [..., H, D]: q_proj | k_proj | v_proj as one GEMM
    with the cached fused weight (see _fused_qkv); gradients reach the original q/k/v parameters.
    onednn: the CPU inference path (see _cpu_inference), bias in the GEMM epilogue; three GEMMs where
    the fused output would reach _ONE_ALLOCATION_BYTES."""
    if onednn:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        heads = (attn.num_heads, attn.head_dim)
        if hidden_states.numel() * 3 * hidden_states.element_size() >= _ONE_ALLOCATION_BYTES:
            return tuple(_onednn_linear(hidden_states, _linear_params(p)).unflatten(-1, heads) for p in projs)
        params = _onednn_params(attn, "_dinofast_qkv_onednn", [*(p.weight for p in projs), *(p.bias for p in projs)],
                                lambda: _concat_qkv(projs))
        return _onednn_linear(hidden_states, params).unflatten(-1, (3, *heads)).unbind(-3)
    weight, bias, cached = _fused_qkv(attn)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    params = [p.weight for p in projs] + [p.bias for p in projs]
    needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if cached and needs_grad and not torch.is_autocast_enabled(hidden_states.device.type):
        qkv = _FusedLinear.apply(hidden_states, weight, bias, [p.out_features for p in projs], *params)
    else:  # no parameter gradient needed, or `weight` is itself a differentiable concatenation
        qkv = F.linear(hidden_states, weight, bias)
    return qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(-3)


def _attention_forward(attn, hidden_states: Tensor, plan: Union[_BatchedPlan, _PackedPlan]) -> Tensor:
    """DINOv3ViTAttention's computation with dinofast ops.

    Batched: hidden_states [B, N, C] with a _BatchedPlan. Packed: [T, C] with a _PackedPlan."""
    return attn.o_proj(_attention_heads(attn, hidden_states, plan))


def _attention_heads(attn, hidden_states: Tensor, plan: Union[_BatchedPlan, _PackedPlan],
                     onednn: bool = False) -> Tensor:
    """_attention_forward before the output projection: the heads' outputs, [..., C].
    onednn: the CPU inference path (see _cpu_inference)."""
    q, k, v = _qkv_projection(attn, hidden_states, onednn)
    if isinstance(plan, _PackedPlan):
        out = _attend_packed(q, k, v, plan, attn.scaling)
    else:
        B, N = hidden_states.shape[:2]
        P = N - plan.hp * plan.wp  # CLS + registers, as transformers infers it
        dropout_p = attn.dropout if attn.training else 0.0
        if _batched_through_cpp(q, attn.head_dim, dropout_p):  # [B, N, H, D] views -> [B * N, H, D] views
            twin = _packed_twin(plan, B, P, q.device)
            out = _attend_packed(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), twin, attn.scaling)
            out = out.unflatten(0, (B, N))
        else:
            out = _attend_batched(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan, P,
                                  attn.scaling, dropout_p).transpose(1, 2)
    return out.flatten(-2)


# The CPU inference path keeps every intermediate below this size: glibc serves larger blocks with
# fresh mmaps (its dynamic threshold stops at 32 MiB), so each one comes back as unmapped pages and
# the op that writes it pays a page fault per 4 KiB. On the 2-core dev box (ViT-B, bf16, 9,367
# packed tokens) the fused QKV GEMM took 22 ms into a fresh [T, 3C] output and 11 ms into a reused
# one, and the MLP 56 ms in one piece and 39 ms in row chunks (78 vs 128 ms at 18,472 tokens).
_ONE_ALLOCATION_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes of the CPU oneDNN path: fp32, and bf16 where oneDNN runs it natively (AVX-512 BF16
    / AMX; elsewhere ATen's own bf16 GEMM is the better choice). Empty without oneDNN post-ops."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def _onednn_linear_available() -> bool:
    return bool(_onednn_dtypes())


def _cpu_inference(layer, x: Tensor) -> bool:
    """True where the oneDNN path runs: contiguous fp32 (or natively supported bf16) CPU tensors in
    the layer's dtype, no autograd, no drop-path (eval), no autocast (its GEMMs would hand
    activations of another dtype to the post-op GEMMs)."""
    # Compilers take the plain path: Inductor does not lower mkldnn._linear_pointwise (it fuses
    # the same epilogues itself) and export has no fake kernel for it.
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not layer.training and x.is_contiguous() and not V.tracing(x) and x.dtype in _onednn_dtypes()
            and x.dtype == layer.attention.o_proj.weight.dtype)


def _onednn_params(module: nn.Module, name: str, sources: Sequence[Tensor | None], build
                   ) -> tuple[Tensor, Tensor | None]:
    """build()'s (weight [C_out, C_in], bias) for the oneDNN GEMMs, the weight in oneDNN's packed
    layout (blocked for AMX / AVX-512) and cached in `module` (see _cached): given a plain weight,
    oneDNN re-packs it on every call, which costs as much as the GEMM itself at a few hundred
    tokens. Costs one packed copy of each weight. Inference tensors: plain, built per call."""
    if V.version_key(*sources) is None:
        return build()

    def packed():
        weight, bias = build()
        return torch.ops.mkldnn._reorder_linear_weight(weight, None), bias

    return _cached(module, name, sources, packed)[0]


def _linear_params(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return _onednn_params(linear, "_dinofast_onednn", [linear.weight, linear.bias],
                          lambda: (linear.weight, linear.bias))


def _onednn_linear(x: Tensor, params: tuple[Tensor, Tensor | None], activation: str = "none") -> Tensor:
    """activation(x @ weight.T + bias) as one oneDNN GEMM (CPU inference path), params from
    _onednn_params: the bias and the activation ("none", "gelu" (erf), "swish") run in the GEMM's
    epilogue. ATen's bf16 addmm first copies the broadcast bias into the output and accumulates onto
    it, one more pass over the output."""
    weight, bias = params
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [],
                                              "none" if activation == "gelu" else "")


def _mlp_hidden(mlp, x: Tensor) -> Tensor:
    """DINOv3ViTMLP / DINOv3ViTGatedMLP up to (not including) down_proj, on the CPU inference path:
    the activation runs in the epilogue of the first GEMM (oneDNN post-op), saving a pass over the
    [tokens, 4C] hidden. None when the activation has no such post-op."""
    gated = hasattr(mlp, "gate_proj")
    if mlp.config.hidden_act not in (("silu", "swish") if gated else ("gelu",)):
        return None
    first = mlp.gate_proj if gated else mlp.up_proj
    h = _onednn_linear(x, _linear_params(first), "swish" if gated else "gelu")
    return h.mul_(_onednn_linear(x, _linear_params(mlp.up_proj))) if gated else h


def _scaled_linear_add(linear, x: Tensor, scale: Tensor, residual: Tensor) -> Tensor:
    """residual + scale * linear(x) as ONE GEMM (CPU inference path): LayerScale folded into the
    weight rows (built once, see _onednn_params), residual added in the GEMM epilogue (oneDNN binary
    post-op)."""
    def build():
        return linear.weight * scale[:, None], None if linear.bias is None else linear.bias * scale

    weight, bias = _onednn_params(linear, "_dinofast_scaled", [linear.weight, linear.bias, scale], build)
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def _mlp_residual(layer, hidden_states: Tensor) -> Tensor:
    """hidden_states + LayerScale(mlp(norm2(hidden_states))) on the CPU inference path (see
    _cpu_inference): the activation in the first GEMM's epilogue, LayerScale and the residual in the
    second's (see _mlp_hidden, _scaled_linear_add). Row-wise: any slice of rows may go alone."""
    x = layer.norm2(hidden_states)
    h = _mlp_hidden(layer.mlp, x)
    if h is None:
        return torch.addcmul(hidden_states, layer.mlp(x), layer.layer_scale2.lambda1)
    return _scaled_linear_add(layer.mlp.down_proj, h, layer.layer_scale2.lambda1, hidden_states)


def _unhooked(module: nn.Module) -> bool:
    """True when calling module.forward directly skips nothing: no forward hooks except
    transformers' output-capturing ones (they record attention maps, which the caller did not ask
    for when it takes a path that bypasses the module)."""
    return not module._forward_pre_hooks and all(
        getattr(h, "__name__", "") == "output_capturing_hook" for h in module._forward_hooks.values())


def _attentions_requested(kwargs) -> bool:
    """True when the caller asked for attention maps: output_attentions=True in this call, or
    config.output_attentions, which transformers' output capturing records (its collector then
    holds an "attentions" list)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers without output capturing passes output_attentions explicitly
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _layer_forward(layer, hidden_states: Tensor, plan, **kwargs) -> Tensor:
    """DINOv3ViTLayer.forward (pre-norm block with LayerScale) with dinofast attention.
    kwargs: transformers' per-call options (output_attentions), handed to the attention module."""
    attn = layer.attention
    if _cpu_inference(layer, hidden_states) and _unhooked(attn) and not _attentions_requested(kwargs):
        h = _attention_heads(attn, layer.norm1(hidden_states), plan, onednn=True)
        hidden_states = _scaled_linear_add(attn.o_proj, h, layer.layer_scale1.lambda1, hidden_states)
        rows = hidden_states.view(-1, hidden_states.shape[-1])
        chunk = max(1, _ONE_ALLOCATION_BYTES // (layer.mlp.up_proj.out_features * rows.element_size()))
        if rows.shape[0] <= chunk:
            return _mlp_residual(layer, hidden_states)
        return torch.cat([_mlp_residual(layer, r) for r in rows.split(chunk)]).view_as(hidden_states)
    if "_dinofast_original" in type(attn).__dict__:
        # Through the module call, so that hooks (transformers records attention maps with one) run.
        h, _ = attn(layer.norm1(hidden_states), position_embeddings=plan, **kwargs)
    else:  # encode_packed on an unpatched model: transformers' own module cannot take a plan
        h = _attention_forward(attn, layer.norm1(hidden_states), plan)
    hidden_states = layer.drop_path(layer.layer_scale1(h)) + hidden_states
    h = layer.mlp(layer.norm2(hidden_states))
    return layer.drop_path(layer.layer_scale2(h)) + hidden_states


def _layer_module_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                          position_embeddings=None, **kwargs) -> Tensor:
    """Patched DINOv3ViTLayer.forward."""
    _check_plan(position_embeddings, attention_mask)
    return _layer_forward(self, hidden_states, position_embeddings, **kwargs)


def _attention_with_weights(attn, hidden_states: Tensor, plan: _BatchedPlan) -> tuple[Tensor, Tensor]:
    """DINOv3ViTAttention with the attention maps materialised, as transformers' eager attention
    computes them: hidden_states [B, N, C] -> (output [B, N, C], weights [B, H, N, N] in the
    input dtype, after dropout in train mode). O(N^2) memory: only when the maps are asked for."""
    B, N = hidden_states.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in _qkv_projection(attn, hidden_states))  # [B, H, N, D]
    q, k = rope2d(q, k, (plan.hp, plan.wp), num_prefix_tokens=N - plan.hp * plan.wp, theta=plan.theta,
                  periods=plan.periods, coord_transform=plan.coord_transform)
    weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scaling, dim=-1)
    weights = F.dropout(weights, p=attn.dropout if attn.training else 0.0, training=attn.training)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(B, N, -1)
    return attn.o_proj(out), weights


# ---------------------------------------------------------------------------------------------
# Patched module forwards
# ---------------------------------------------------------------------------------------------
def _rope_forward(self, pixel_values: Tensor) -> _BatchedPlan:
    """Patched DINOv3ViTRopePositionEmbedding.forward: the plan instead of cos/sin tables."""
    ph, pw = _patch_size(self.config)
    _, _, height, width = pixel_values.shape
    transform = None
    if self.training:  # transformers augments whenever the module is in train mode
        transform = _coord_transform(self.config, 1, pixel_values.device)
        transform = None if transform is None else transform[0]
    return _BatchedPlan(height // ph, width // pw, float(self.base), _stored_periods(self), transform)


def _attention_module_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                              position_embeddings=None, **kwargs):
    """Patched DINOv3ViTAttention.forward: (output, attention maps or None), as transformers returns
    them: the maps when output_attentions=True with the "eager" attention implementation (the one
    that computes them; transformers' sdpa/flash return None), else None."""
    _check_plan(position_embeddings, attention_mask)
    if (isinstance(position_embeddings, _BatchedPlan) and self.config._attn_implementation == "eager"
            and _attentions_requested(kwargs)):
        return _attention_with_weights(self, hidden_states, position_embeddings)
    return _attention_forward(self, hidden_states, position_embeddings), None


def _check_plan(position_embeddings, attention_mask) -> None:
    if not isinstance(position_embeddings, (_BatchedPlan, _PackedPlan)):
        raise ValueError(
            "position_embeddings: expected the plan of a dinofast-patched rope_embeddings module "
            f"(this layer is patched by dinofast.patch_dinov3), got {type(position_embeddings).__name__}; "
            "patch the whole model with dinofast.patch_dinov3(model) or unpatch it")
    if attention_mask is not None:
        raise ValueError("attention_mask: expected None (DINOv3 attends to every token), got a tensor")


_PATCHED_FORWARDS = {
    "DINOv3ViTRopePositionEmbedding": _rope_forward,
    "DINOv3ViTAttention": _attention_module_forward,
    "DINOv3ViTLayer": _layer_module_forward,
}
_SUBCLASSES: Dict[type, type] = {}


def _dinofast_subclass(cls: type, forward) -> type:
    """A subclass of `cls` whose forward is dinofast's (one per original class, cached)."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type("Dinofast" + cls.__name__, (cls,), {
            "forward": forward, "_dinofast_original": cls, "__module__": __name__,
            "__doc__": f"{cls.__name__} running dinofast ops (see dinofast.patch_dinov3).",
        })
    return _SUBCLASSES[cls]


def _original_class(module: nn.Module) -> type:
    return type(module).__dict__.get("_dinofast_original", type(module))


def is_patched(model: nn.Module) -> bool:
    """True when patch_dinov3 has been applied to `model` (and not undone)."""
    return any("_dinofast_original" in type(m).__dict__ for m in model.modules())


def check_dinov3(model, arg: str = "model") -> None:
    """ValueError unless `model` is a transformers DINOv3ViTModel or DINOv3ViTBackbone."""
    m = _transformers_dinov3()
    if not isinstance(model, (m.DINOv3ViTModel, m.DINOv3ViTBackbone)):
        V.fail(arg, "a transformers DINOv3ViTModel or DINOv3ViTBackbone", type(model).__name__)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    V.check_head_dim(head_dim, f"{arg}.config hidden_size / num_attention_heads (head dim)")


def patch_dinov3(model):
    """Swap dinofast's attention (fused q|k|v, fused 2D RoPE, attention) into a transformers
    DINOv3ViTModel / DINOv3ViTBackbone in place; returns the model. Idempotent.

    Parameters, buffers and state-dict keys are unchanged; outputs equal the unpatched model's
    (GELU or gated MLP, any number of registers, eval or train mode, autograd). Undo with
    dinofast.unpatch_dinov3."""
    check_dinov3(model)
    for module in model.modules():
        cls = _original_class(module)
        forward = _PATCHED_FORWARDS.get(cls.__name__)
        if forward is not None and cls.__module__.startswith("transformers."):
            module.__class__ = _dinofast_subclass(cls, forward)
    return model


def unpatch_dinov3(model):
    """Undo patch_dinov3 in place (a model that is not patched is returned unchanged)."""
    check_dinov3(model)
    for module in model.modules():
        module.__class__ = _original_class(module)
        module.__dict__.pop("_dinofast_periods", None)
    return model


# ---------------------------------------------------------------------------------------------
# Packed mixed-resolution forward
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageFeatures:
    """One image's tokens from encode_packed (views into the packed output).

    cls [D], registers [R, D], patches [Hp, Wp, D]; layers: {requested layer index: ImageFeatures
    of that layer's hidden state} (empty when no output_layers were asked)."""

    cls: Tensor
    registers: Tensor
    patches: Tensor
    layers: Dict[int, "ImageFeatures"] = field(default_factory=dict)


def _check_images(images, num_channels: int, patch: Tuple[int, int], device: torch.device) -> None:
    if not isinstance(images, (list, tuple)):
        V.fail("images", "a list of [3, H, W] tensors", type(images).__name__)
    if len(images) == 0:
        V.fail("images", "a non-empty list of [3, H, W] tensors", "an empty list")
    first = images[0]
    for i, img in enumerate(images):
        name = f"images[{i}]"
        V.check_tensor(img, name, ndim=3, dtypes=V.FLOAT_DTYPES)
        if img.shape[0] != num_channels:
            V.fail(name, f"[{num_channels}, H, W] (channels first)", f"shape {tuple(img.shape)}")
        H, W = img.shape[1:]
        if H == 0 or W == 0 or H % patch[0] or W % patch[1]:
            V.fail(name, f"H and W positive multiples of the patch size {patch[0]}x{patch[1]}",
                   f"size {H}x{W} (HxW)")
        if img.dtype != first.dtype:
            V.fail(name, f"dtype {first.dtype} (as images[0])", img.dtype)
        if img.device != first.device:
            V.fail(name, f"device {first.device} (as images[0])", img.device)
    if first.device != device:
        V.fail("images", f"tensors on the model's device {device}", first.device)


def _check_layers(output_layers, num_layers: int) -> List[int]:
    if output_layers is None:
        return []
    if isinstance(output_layers, int) or not isinstance(output_layers, (list, tuple)):
        V.fail("output_layers", "a list of layer indices (ints, negative from the end)", output_layers)
    for i in output_layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -num_layers <= i < num_layers:
            V.fail("output_layers", f"ints in [-{num_layers}, {num_layers - 1}] ({num_layers} layers)", output_layers)
    return list(output_layers)


def _patch_embed(embeddings, images: Sequence[Tensor], patch: Tuple[int, int]) -> Tensor:
    """Conv2d(kernel = stride = patch) of every image as ONE GEMM: [sum Hp*Wp, C], row-major per image."""
    conv = embeddings.patch_embeddings
    ph, pw = patch
    cols = []
    for img in images:
        c, H, W = img.shape
        cols.append(img.to(conv.weight.dtype).reshape(c, H // ph, ph, W // pw, pw)
                    .permute(1, 3, 0, 2, 4).reshape(-1, c * ph * pw))
    return F.linear(torch.cat(cols), conv.weight.flatten(1), conv.bias)


def _encode_tokens(model, patch_tokens: Tensor, grids: Sequence[Tuple[int, int]], wanted: Sequence[int] = ()
                   ) -> Tuple[Tensor, _PackedPlan, List[int], int, Dict[int, Tensor]]:
    """The packed forward after the patch embedding (shared by encode_packed and the vision tower).

    patch_tokens [sum Hp_i*Wp_i, C]: every image's embedded patches, row-major per image, images
    back to back; grids: host (Hp_i, Wp_i). Returns (out [T, C] after the final norm, with
    [CLS, registers, patches] per image; the plan (cu_seqlens int32 [n+1], rope.grids int32 [n, 2]
    on the model's device); cu (host copy of cu_seqlens); P = 1 + registers; {layer index: that
    layer's output [T, C]} for the layers in `wanted`)."""
    config = model.config
    weight = model.embeddings.patch_embeddings.weight
    layers = model.model.layer
    if model.training and (config.drop_path_rate > 0 or config.attention_dropout > 0):
        V.fail("model", "eval mode, or train mode without drop_path_rate / attention_dropout (not supported "
               "packed)", f"drop_path_rate={config.drop_path_rate}, attention_dropout={config.attention_dropout}")
    device = weight.device
    emb = model.embeddings
    prefix = torch.cat([emb.cls_token[0], emb.register_tokens[0]]).to(weight.dtype)  # [P, C]
    P = prefix.shape[0]
    patches = patch_tokens.split([hp * wp for hp, wp in grids])
    x = torch.cat([t for p in patches for t in (prefix, p)])  # [T, C]: [CLS, regs, patches] per image

    # The metadata, once per forward: on the host (every layer's checks and launch sizes) and one
    # copy of each tensor on the device (what the kernels read).
    layout = PackedLayout.from_grids(grids, P)
    cu = layout.cu_seqlens
    rope_module = model.rope_embeddings
    transform = _coord_transform(config, len(grids), device) if rope_module.training else None
    plan = _PackedPlan(
        int32_on(cu, device), layout.max_seqlen,
        RopeSpec(int32_on(grids, device), P, float(rope_module.base), _stored_periods(rope_module), transform),
        layout)

    saved = {}
    normalized = {i % len(layers) for i in wanted}
    for i, layer in enumerate(layers):
        x = _layer_forward(layer, x, plan)
        if i in normalized:
            saved[i] = x
    out = model.norm(x)
    return out, plan, cu, P, saved


def encode_packed(model, images: Sequence[Tensor], output_layers: Optional[Sequence[int]] = None
                  ) -> List[ImageFeatures]:
    """One forward of a DINOv3 model over images of different sizes, packed without padding.

    model: a transformers DINOv3ViTModel / DINOv3ViTBackbone (patched or not; its modules are used
    as they are, so weights and autograd are shared). images: list of [C, H_i, W_i] float tensors,
    H_i and W_i multiples of the patch size, one dtype and device (the model's; cast to the model
    dtype like transformers). output_layers: indices of transformer layers (0-based, negative
    from the end) whose outputs (before the final norm, = transformers' hidden_states[i + 1]) are
    returned too.

    Returns one ImageFeatures per image: cls [D], registers [R, D], patches [Hp_i, Wp_i, D] after
    the final norm (= last_hidden_state of that image run alone), and .layers.
    In train mode the RoPE coordinate augmentation is drawn per image, in image order (as a loop
    over the images would draw it); dropout and drop-path are not supported packed.
    """
    check_dinov3(model)
    config = model.config
    patch = _patch_size(config)
    weight = model.embeddings.patch_embeddings.weight
    _check_images(images, config.num_channels, patch, weight.device)
    layers = model.model.layer
    wanted = _check_layers(output_layers, len(layers))
    grids = [(img.shape[1] // patch[0], img.shape[2] // patch[1]) for img in images]
    out, _, cu, P, saved = _encode_tokens(model, _patch_embed(model.embeddings, images, patch), grids, wanted)

    def split(t: Tensor) -> List[ImageFeatures]:
        return [ImageFeatures(t[a], t[a + 1:a + P], t[a + P:b].unflatten(0, (hp, wp)))
                for a, b, (hp, wp) in zip(cu[:-1], cu[1:], grids)]

    results = split(out)
    for i in wanted:
        for r, feats in zip(results, split(saved[i % len(layers)])):
            r.layers[i] = feats
    return results
