"""One decode step (one new token per row) written out for the model families we know: fewer ops than
transformers' modules run, the same results.

At one row a SmolLM2 decode step through `model(...)` spends about as long outside the matrix products
as in them: each of 30 layers goes through several module calls, keyword plumbing, mask and cache
bookkeeping and a dozen small tensors. This step calls the same submodules (norms, linear layers in whatever
numeric mode, rotary embedding, activation) in the same order with the same operations, and hands attention
to the KV cache (`Attend`, below; the engine's DecodeView reads each row's own tokens, with the ragged C kernel
where it runs); on the cache's torch path its logits equal the model's own forward bit for bit
(tests/models/layers/test_decode_step.py checks `torch.equal`); what it leaves out is the plumbing. Where
q/k/v or gate/up were fused into one product (numerics/fusion.py), it calls that product once and rotates
q and k together.

Where the elementwise work runs in C (int4 x int8, int8, bf16), `prefill` (Llama's and GPT-2's) is the same
layers over several prompts' tokens at once: transformers' forward of one 110-token SmolLM2 prompt spends ~15 ms of ~110
outside its products and attention, and one pass per prompt makes 30 x 7 small calls per prompt.

`for_model` returns None for any model it does not know or any option it does not implement (then the
caller runs the model's forward): Llama-style models (Llama, SmolLM2 and others with `LlamaForCausalLM`'s
layout; Qwen2, whose q/k/v carry biases) and GPT-2, on the CPU decode attention. The GPU and the stock model
keep the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from app.models.layers import native_step
from app.models.layers.attention import NAME
from app.models.numerics import elementwise, modes
from app.models.numerics.fusion import fused_product


class Attend(Protocol):
    """The cache's side of a decode step (app/engine/kv_cache.DecodeView): store layer `layer`'s new k, v
    (B, Hkv, 1, D) of every row and return the attention of q (B, Hq, 1, D) over each row's tokens, (B, 1, Hq, D)."""

    def attend(self, layer: int, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor: ...  # fmt: skip

    def ragged(self) -> native_step.Ragged | None:
        """What the ragged C kernel needs to run this step's attention from C, or None where it does not run."""


# (last token of each row (B,), its position (B,), the step's view of the KV cache) -> logits (B, V)
Step = Callable[[torch.Tensor, torch.Tensor, Attend], torch.Tensor]


class AttendPrompts(Protocol):
    """The cache's side of a prompt pass (app/engine/kv_views.PromptView): store layer `layer`'s k, v (T, Hkv, D)
    of every prompt token and return each token's causal attention over its own prompt, (T, Hq, D)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class WrittenOut:
    """What the written-out steps share: the C elementwise ops where the mode runs them, and with them a prompt
    pass (`prefill`)."""

    ops: elementwise.Elementwise | None
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def prompts(self) -> bool:
        """Whether `prefill` runs: prompts take the written-out pass where the C elementwise ops do."""
        return self.ops is not None

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                cache: AttendPrompts) -> torch.Tensor:  # fmt: skip
        """Several prompts' tokens in one pass: ids and positions (T,), the prompts one after another; `last`
        (P,) the index of each prompt's last token -> logits (P, V) there."""
        raise NotImplementedError


class LlamaStep(WrittenOut):
    """LlamaForCausalLM's decode (and Qwen2's: the same block, q/k/v with biases): RMSNorm -> q/k/v -> rotary ->
    attention -> o -> RMSNorm -> gate/up -> down."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.model = model
        self.base = model.model
        self.q_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = []
        for layer in self.base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = fused_product([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = fused_product([mlp.gate_proj, mlp.up_proj])
            self.layers.append((layer, qkv, gate_up))
        # the elementwise work in C where the model runs a mode that is not token-exact anyway (int4 x int8,
        # bf16: modes.inexact) and every layer has its fused products
        fused = all(qkv is not None and gate_up is not None for _, qkv, gate_up in self.layers)
        self.ops = elementwise.load() if modes.inexact(model) and fused and config.hidden_act == "silu" else None
        # per layer h -> silu(gate) * up: in the gate/up product's store where it runs the group-quantized kernel
        ops, gate_ups = self.ops, [g for _, _, g in self.layers if g is not None]
        self.swiglu = [] if ops is None else [elementwise.swiglu_product(g, ops) for g in gate_ups]
        # the norm that follows each layer: the next layer's input norm, after the last one the final norm
        self.norms_after = [layer.input_layernorm for layer, _, _ in self.layers[1:]] + [self.base.norm]
        # where every product is the group-quantized kernel's: the layers in one C call (layers/native_step.py)
        shape = (config.hidden_size, self.q_heads, self.kv_heads, self.head_dim, config.intermediate_size)
        self.native = None
        if self.ops is not None:
            products = [[qkv, layer.self_attn.o_proj, gate_up, layer.mlp.down_proj]
                        for layer, qkv, gate_up in self.layers]  # fmt: skip
            posts = [layer.post_attention_layernorm for layer, _, _ in self.layers]
            norms = list(zip(posts, self.norms_after, strict=True))
            scales = {float(layer.self_attn.scaling) for layer, _, _ in self.layers}
            self.native = native_step.build(products, norms, scales, self.ops, shape)
        # the rotary cos / sin of positions [0, P), (P, D) each: a row's are looked up, not computed each step
        # (the module's forward, ~100 us a call). Only where they depend on the position alone: not dynamic
        # scaling, whose frequencies change with the sequence length.
        rope_type = str(getattr(self.base.rotary_emb, "rope_type", "default"))
        self._fixed_rope = "dynamic" not in rope_type and rope_type != "longrope"
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N,) -> their embeddings (N, E) fp32 contiguous (a plain nn.Embedding's rows without its module
        call; any other embedding module through its forward)."""
        embed = self.base.embed_tokens
        x = embed.weight.index_select(0, ids) if type(embed) is nn.Embedding else embed(ids)
        return x.float().contiguous()

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin, (N, D) fp32 contiguous each, of `positions` (N,) (x: the fp32 residual stream,
        for the module's dtype and device): the module's own values, computed once per position."""
        d = self.head_dim
        if not self._fixed_rope:
            cos, sin = self.base.rotary_emb(x[None], positions[None])  # (1, N, D) each
            return cos.reshape(-1, d).float().contiguous(), sin.reshape(-1, d).float().contiguous()
        need = int(positions.max()) + 1
        if self._rope_table is None or self._rope_table[0].shape[0] < need:
            held = 0 if self._rope_table is None else self._rope_table[0].shape[0]
            span = torch.arange(max(need, 2 * held, 1024), device=positions.device)  # (P,)
            cos, sin = self.base.rotary_emb(x[:1, None], span[None])  # (1, P, D) each
            self._rope_table = (cos[0].float().contiguous(), sin[0].float().contiguous())
        cos_table, sin_table = self._rope_table
        return cos_table.index_select(0, positions), sin_table.index_select(0, positions)  # (N, D) each

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: Attend) -> torch.Tensor:
        if self.ops is not None:
            return self._with_ops(self.ops, ids, positions, cache)
        rows, hq, hkv, d = ids.shape[0], self.q_heads, self.kv_heads, self.head_dim
        x = self.base.embed_tokens(ids[:, None])  # (B, 1, E)
        cos, sin = self.base.rotary_emb(x, positions[:, None])  # (B, 1, D) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, D)
        for i, (layer, qkv, gate_up) in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)  # (B, 1, E)
            if qkv is not None:
                y = qkv(h)  # (B, 1, (Hq + 2 Hkv) D)
                qk = y[..., : (hq + hkv) * d].view(rows, 1, hq + hkv, d).transpose(1, 2)  # (B, Hq + Hkv, 1, D)
                qk = (qk * cos) + (_rotate_half(qk) * sin)
                q, k = qk[:, :hq], qk[:, hq:]  # (B, Hq, 1, D), (B, Hkv, 1, D)
                v = y[..., (hq + hkv) * d :].view(rows, 1, hkv, d).transpose(1, 2)  # (B, Hkv, 1, D)
            else:
                q = attn.q_proj(h).view(rows, 1, hq, d).transpose(1, 2)  # (B, Hq, 1, D)
                k = attn.k_proj(h).view(rows, 1, hkv, d).transpose(1, 2)  # (B, Hkv, 1, D)
                v = attn.v_proj(h).view(rows, 1, hkv, d).transpose(1, 2)
                q = (q * cos) + (_rotate_half(q) * sin)
                k = (k * cos) + (_rotate_half(k) * sin)
            a = cache.attend(i, attn, q, k, v, attn.scaling)  # (B, 1, Hq, D)
            x = x + attn.o_proj(a.reshape(rows, 1, hq * d).contiguous())
            h = layer.post_attention_layernorm(x)
            if gate_up is not None:
                g = gate_up(h)  # (B, 1, 2 I)
                half = g.shape[-1] // 2
                m = mlp.act_fn(g[..., :half]) * g[..., half:]
            else:
                m = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
            x = x + mlp.down_proj(m)
        logits: torch.Tensor = self.model.lm_head(self.base.norm(x))  # (B, 1, V)
        return logits[:, -1, :]


    def _with_ops(self, ops: elementwise.Elementwise, ids: torch.Tensor, positions: torch.Tensor,
                  cache: Attend) -> torch.Tensor:  # fmt: skip
        """The same step with its norms, residual adds, rotary and SwiGLU in C: a dozen ops fewer per layer."""
        rows, hq, hkv, d = ids.shape[0], self.q_heads, self.kv_heads, self.head_dim
        x = self._embed(ids)  # (B, E): the residual stream, updated in place
        cos, sin = self._cos_sin(x, positions)  # (B, D) each
        first = self.layers[0][0].input_layernorm
        h = ops.add_rms_norm(x, None, first.weight, first.variance_epsilon)  # (B, E)
        ragged = None if self.native is None else cache.ragged()
        if self.native is not None and ragged is not None:  # the same loop in C
            h = self.native(x, h, cos, sin, float(self.layers[0][0].self_attn.scaling), ragged)
            return self.model.lm_head(h)  # type: ignore[no-any-return]
        for i, ((layer, qkv, gate_up), after) in enumerate(zip(self.layers, self.norms_after, strict=True)):
            attn, post = layer.self_attn, layer.post_attention_layernorm
            assert qkv is not None and gate_up is not None  # ops are only set up where every layer has both
            q, k, v = ops.rope_split(qkv(h), cos, sin, hq, hkv, d)  # (B, Hq, D), (B, Hkv, D) x 2
            a = cache.attend(i, attn, q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), attn.scaling)  # (B, 1, Hq, D)
            h = ops.add_rms_norm(x, attn.o_proj(a.reshape(rows, hq * d)), post.weight, post.variance_epsilon)
            m = self.swiglu[i](h)  # (B, I)
            h = ops.add_rms_norm(x, layer.mlp.down_proj(m), after.weight, after.variance_epsilon)
        logits: torch.Tensor = self.model.lm_head(h)  # (B, V)
        return logits

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                cache: AttendPrompts) -> torch.Tensor:  # fmt: skip
        """Several prompts' tokens in one pass: ids and positions (T,), the prompts one after another; `last`
        (P,) the index of each prompt's last token -> logits (P, V) there. Every product runs once over all T
        rows (each row's result is the kernel's whatever the other rows: app/models/numerics/group_quant.py); only
        attention is per prompt (`cache`). The last layer's output projection and MLP run on the `last` rows
        only: nothing else reads them."""
        ops = self.ops
        assert ops is not None, "the prompt pass runs where the elementwise ops do"
        hq, hkv, d = self.q_heads, self.kv_heads, self.head_dim
        x = self._embed(ids)  # (T, E)
        cos, sin = self._cos_sin(x, positions)  # (T, D) each
        first = self.layers[0][0].input_layernorm
        h = ops.add_rms_norm(x, None, first.weight, first.variance_epsilon)  # (T, E)
        final = len(self.layers) - 1
        for i, ((layer, qkv, gate_up), after) in enumerate(zip(self.layers, self.norms_after, strict=True)):
            attn, post = layer.self_attn, layer.post_attention_layernorm
            assert qkv is not None and gate_up is not None  # ops are only set up where every layer has both
            q, k, v = ops.rope_split(qkv(h), cos, sin, hq, hkv, d)  # (T, Hq, D), (T, Hkv, D) x 2
            a = cache.attend(i, q, k, v, attn.scaling).reshape(-1, hq * d)  # (T, Hq D)
            if i == final:
                a, x = a[last].contiguous(), x[last].contiguous()  # (P, Hq D), (P, E)
            h = ops.add_rms_norm(x, attn.o_proj(a), post.weight, post.variance_epsilon)
            m = self.swiglu[i](h)  # (., I)
            h = ops.add_rms_norm(x, layer.mlp.down_proj(m), after.weight, after.variance_epsilon)
        logits: torch.Tensor = self.model.lm_head(h)  # (P, V)
        return logits


class Gpt2Step(WrittenOut):
    """GPT2LMHeadModel's decode: LayerNorm -> c_attn -> attention -> c_proj -> LayerNorm -> c_fc -> GELU -> c_proj.
    Where the elementwise work runs in C (as LlamaStep's: int4 x int8, int8, bf16), the norms, the q/k/v split and
    GELU are one call each, the layers one C call where every product is the kernel's, and `prefill` the same
    layers over several prompts' tokens at once."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.model = model
        self.base = model.transformer
        self.q_heads = self.kv_heads = self.heads = config.n_head
        self.head_dim = config.n_embd // self.heads
        blocks = list(self.base.h)
        # the norm that follows each block's MLP: the next block's first norm, after the last one the final norm
        self.norms_after = [block.ln_1 for block in blocks[1:]] + [self.base.ln_f]
        tanh_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.ops = elementwise.load() if modes.inexact(model) and tanh_gelu else None
        self.native = None
        if self.ops is not None:
            products = [[b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj] for b in blocks]
            norms = [(b.ln_2, after) for b, after in zip(blocks, self.norms_after, strict=True)]
            shape = (config.n_embd, self.heads, self.heads, self.head_dim, config.n_inner or 4 * config.n_embd)
            scales = {float(b.attn.scaling) for b in blocks}
            self.native = native_step.build(products, norms, scales, self.ops, shape, gpt2=True)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: Attend) -> torch.Tensor:
        if self.ops is not None:
            return self._with_ops(self.ops, ids, positions, cache)
        rows, heads, d = ids.shape[0], self.heads, self.head_dim
        x = self.base.wte(ids[:, None]) + self.base.wpe(positions[:, None])  # (B, 1, E)
        for i, block in enumerate(self.base.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(heads * d, dim=2)  # (B, 1, E) each
            q, k, v = (t.view(rows, 1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, 1, D)
            a = cache.attend(i, attn, q, k, v, attn.scaling)  # (B, 1, H, D)
            x = attn.c_proj(a.reshape(rows, 1, heads * d).contiguous()) + x
            x = x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))
        logits: torch.Tensor = self.model.lm_head(self.base.ln_f(x))  # (B, 1, V)
        return logits[:, -1, :]

    def _start(self, ops: elementwise.Elementwise, ids: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The residual stream x (N, E) fp32 of tokens `ids` at `positions` (N,), and the first norm's h (N, E)."""
        wte, wpe = self.base.wte, self.base.wpe
        tokens = wte.weight.index_select(0, ids) if type(wte) is nn.Embedding else wte(ids)
        x = (tokens.float() + wpe.weight.index_select(0, positions).float()).contiguous()
        ln = self.base.h[0].ln_1
        return x, ops.add_layer_norm(x, None, ln.weight, ln.bias, ln.eps)

    def _block(self, ops: elementwise.Elementwise, i: int, x: torch.Tensor, h: torch.Tensor,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
               last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Block i over rows x, h (N, E) -> (x, h) after it; `attend(q, k, v)` (N, H, D) each -> (N, H, D); `last`:
        the rows to keep after attention (the prompt pass's last layer)."""
        block, after = self.base.h[i], self.norms_after[i]
        q, k, v = ops.rope_split(block.attn.c_attn(h), None, None, self.heads, self.heads, self.head_dim)
        a = attend(q, k, v).reshape(-1, self.heads * self.head_dim)  # (N, E)
        if last is not None:
            a, x = a[last].contiguous(), x[last].contiguous()
        h = ops.add_layer_norm(x, block.attn.c_proj(a), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        m = ops.gelu(block.mlp.c_fc(h))
        return x, ops.add_layer_norm(x, block.mlp.c_proj(m), after.weight, after.bias, after.eps)

    def _with_ops(self, ops: elementwise.Elementwise, ids: torch.Tensor, positions: torch.Tensor,
                  cache: Attend) -> torch.Tensor:  # fmt: skip
        """The same step with its norms, split and GELU in C (and its layers in one C call where they run there)."""
        x, h = self._start(ops, ids, positions)  # (B, E) each
        scale = float(self.base.h[0].attn.scaling)
        ragged = None if self.native is None else cache.ragged()
        if self.native is not None and ragged is not None:
            h = self.native(x, h, None, None, scale, ragged)
        else:
            for i in range(len(self.base.h)):
                def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                    a = cache.attend(i, self.base.h[i].attn, q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), scale)
                    return a.reshape(q.shape)  # (B, 1, H, D) -> (B, H, D)
                x, h = self._block(ops, i, x, h, attend)
        logits: torch.Tensor = self.model.lm_head(h)  # (B, V)
        return logits

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                cache: AttendPrompts) -> torch.Tensor:  # fmt: skip
        """Several prompts' tokens in one pass, as LlamaStep.prefill: ids and positions (T,), `last` (P,) each
        prompt's last token -> logits (P, V) there."""
        ops = self.ops
        assert ops is not None, "the prompt pass runs where the elementwise ops do"
        x, h = self._start(ops, ids, positions)  # (T, E) each
        final = len(self.base.h) - 1
        for i in range(len(self.base.h)):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                return cache.attend(i, q, k, v, float(self.base.h[i].attn.scaling))
            x, h = self._block(ops, i, x, h, attend, last if i == final else None)
        logits: torch.Tensor = self.model.lm_head(h)  # (P, V)
        return logits


def for_model(model: Any) -> Step | None:
    """The written-out decode step for `model`, or None where the model's own forward must run."""
    config = model.config
    kind = type(model).__name__
    # only over the CPU decode attention the model itself runs (app/models/layers/attention.py): the stock model and
    # the GPU keep their own forward
    if model.training or getattr(config, "_attn_implementation", None) != NAME:
        return None
    if kind == "LlamaForCausalLM" and getattr(config, "pretraining_tp", 1) == 1:
        return LlamaStep(model)
    # Qwen2 is Llama's block with biases on q/k/v (the products carry them); not with its sliding window in use
    if kind == "Qwen2ForCausalLM" and not getattr(config, "use_sliding_window", False):
        return LlamaStep(model)
    if kind == "GPT2LMHeadModel" and not (config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn
                                          or config.add_cross_attention):  # fmt: skip
        return Gpt2Step(model)
    return None
