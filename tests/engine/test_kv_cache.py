"""The ragged KV cache: segments placed first-fit and compacted, tokens written and read back in both layouts,
a bounded arena that never grows, and decode attention (C kernel and torch path) equal to plain attention."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from app.engine.kv_cache import BLOCK, RaggedCache, SegmentSpace, blocks_for, token_bytes
from app.engine.kv_views import DecodeView
from app.models.loading.loader import LoadedModel


def like(heads: int = 2, dim: int = 32, layers: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, heads, 1, dim), torch.zeros(1, heads, 1, dim)) for _ in range(layers)]


def test_segments_are_placed_first_fit_and_compaction_closes_the_gaps() -> None:
    space = SegmentSpace(10)
    a, b, c = space.place(3), space.place(3), space.place(3)
    assert (a and b and c) and (a.start, b.start, c.start) == (0, 3, 6)
    assert space.place(2) is None  # 1 block left
    space.free(b)
    d = space.place(2)
    assert d is not None and d.start == 3  # the first gap that fits
    space.free(a)
    assert space.place(4) is None  # 4 free (0-2 and 5, 9) but no gap of 4
    moved = space.compact()
    assert [(s.start, old) for s, old in moved] == [(0, 3), (2, 6)] and space.place(4) is not None


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernel"])
def test_tokens_read_back_as_written_across_compaction(kernel: bool) -> None:
    cache = RaggedCache(num_layers=3, max_tokens=20 * BLOCK, kernel=kernel)
    cache.allocate(like(), q_heads=2)
    torch.manual_seed(0)
    first, second = cache.hold(40), cache.hold(5 * BLOCK)
    data = {id(s): [(torch.randn(1, 2, n, 32), torch.randn(1, 2, n, 32)) for _ in range(3)]
            for s, n in ((first, 37), (second, 70))}  # fmt: skip
    for seg in (first, second):
        for layer, (k, v) in enumerate(data[id(seg)]):
            cache.write(layer, seg, 0, k[:, :, :20], v[:, :, :20])  # in two pieces, like a chunked prompt
            cache.write(layer, seg, 20, k[:, :, 20:], v[:, :, 20:])
    cache.drop(first)
    big = cache.hold(15 * BLOCK)  # 3 blocks free at the start, 12 after `second`: fits only once compacted
    assert second.start == 0 and big.start == 5
    for layer, (k, v) in enumerate(data[id(second)]):
        got_k, got_v = cache.read(layer, second, 70)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(RuntimeError, match="KV cache bound"):
        cache.hold(BLOCK)


def test_the_bounded_arena_is_allocated_once_and_charged_by_held_blocks() -> None:
    cache = RaggedCache(num_layers=3, max_tokens=1024, slack_tokens=8)
    cache.allocate(like())
    per_token = 3 * 2 * 2 * 32 * 4  # layers x (K, V) x heads x dim x fp32
    assert cache.capacity_bytes() == (1024 + 8) * per_token and cache.nbytes() == 0
    segs = [cache.hold(20) for _ in range(10)]  # 2 blocks each
    assert cache.nbytes() == 10 * 2 * BLOCK * per_token
    arena = [k.data_ptr() for k, _ in cache._flat]
    for s in segs:
        cache.drop(s)
    cache.hold(1000)  # one long row takes what it needs, no geometry to reshape
    assert [k.data_ptr() for k, _ in cache._flat] == arena and cache.capacity_bytes() == (1024 + 8) * per_token


def test_an_unbounded_cache_grows_and_keeps_what_rows_hold() -> None:
    cache = RaggedCache(num_layers=1, max_tokens=None)
    cache.allocate(like(layers=1))
    seg = cache.hold(10)
    k = torch.randn(1, 2, 10, 32)
    cache.write(0, seg, 0, k, -k)
    cache.hold(5000)  # past the initial 64 blocks
    assert cache.space.capacity * BLOCK >= 5010
    got_k, got_v = cache.read(0, seg, 10)
    assert torch.equal(got_k, k) and torch.equal(got_v, -k)


@pytest.mark.parametrize(("kernel", "kv_dtype"), [(False, None), (True, None), (True, torch.bfloat16),
                                                  (True, torch.int8)],
                         ids=["torch", "kernel", "kernel-bf16", "kernel-int8"])  # fmt: skip
@pytest.mark.parametrize(("heads", "group", "dim"), [(3, 3, 64), (2, 1, 32)])
def test_decode_attention_equals_plain_attention_per_row(kernel: bool, kv_dtype: torch.dtype | None, heads: int,
                                                         group: int, dim: int) -> None:  # fmt: skip
    """Rows of 1 to 600 tokens (a long one spans jobs of the kernel), each attending to its own tokens only;
    a bf16 or int8 cache attends over the keys and values as it holds them (what `read` hands back: rounded to
    bf16, or int8 times the token's scale), new tokens included."""
    torch.manual_seed(0)
    lengths = [5, 17, 600, 0, 255]
    cache = RaggedCache(num_layers=1, max_tokens=2048, kernel=kernel, kv_dtype=kv_dtype)
    cache.allocate(like(heads, dim, 1), q_heads=heads * group)
    if not kernel:
        assert cache.kernel is None and not cache.transposed
    segs = [cache.hold(n + 1) for n in lengths]
    kv = [(torch.randn(1, heads, n, dim), torch.randn(1, heads, n, dim)) for n in lengths]
    for seg, (k, v) in zip(segs, kv, strict=True):
        cache.write(0, seg, 0, k, v)
    q = torch.randn(len(lengths), heads * group, 1, dim)
    new_k, new_v = torch.randn(len(lengths), heads, 1, dim), torch.randn(len(lengths), heads, 1, dim)
    out = DecodeView(cache, segs, lengths).attend(0, nn.Module(), q, new_k, new_v, dim**-0.5)  # (B, 1, Hq, D)
    stored = cache.store  # what the arena holds: bf16 / int8 where asked and the kernel runs
    if kv_dtype is not None and cache.kernel is not None:
        assert stored == kv_dtype

    for row, (seg, (k, v)) in enumerate(zip(segs, kv, strict=True)):
        keys, values = (t[0] for t in cache.read(0, seg, lengths[row] + 1))  # (H, n + 1, D) as held
        if stored != torch.int8:  # bf16 / fp32: rounded as a cast rounds
            assert torch.equal(keys, torch.cat([k[0], new_k[row]], dim=1).to(stored).float())
            assert torch.equal(values, torch.cat([v[0], new_v[row]], dim=1).to(stored).float())
        qr = q[row, :, 0].view(heads, group, dim)
        expected = (torch.softmax(qr @ keys.transpose(-1, -2) * dim**-0.5, -1) @ values).reshape(heads * group, dim)
        assert torch.allclose(out[row, 0], expected, atol=1e-5)
    # the new token was stored where the next step reads it
    for seg, n, row in zip(segs, lengths, range(len(lengths)), strict=True):
        back = cache.read(0, seg, n + 1)[0][0, :, n]  # (H, D)
        if stored == torch.int8:  # within half a step (amax / 254) of each head's values
            half_step = new_k[row, :, 0].abs().amax(-1, keepdim=True) / 254 * 1.001
            assert ((back - new_k[row, :, 0]).abs() <= half_step).all()
        else:
            assert torch.equal(back, new_k[row, :, 0].to(stored).float())


def _narrow_and_plain(kv_dtype: torch.dtype) -> tuple[RaggedCache, RaggedCache]:
    """A cache storing `kv_dtype` (skipped where no kernel builds) and a plain fp32 one, both allocated alike."""
    cache = RaggedCache(num_layers=1, max_tokens=2048, kv_dtype=kv_dtype)
    cache.allocate(like(3, 64, 1), q_heads=9)
    plain = RaggedCache(num_layers=1, max_tokens=2048)
    plain.allocate(like(3, 64, 1), q_heads=9)
    if cache.kernel is None:
        pytest.skip("no kernel here: the cache keeps the model's dtype")
    assert cache.store == kv_dtype and cache.keys[0].dtype == kv_dtype
    return cache, plain


def test_an_int8_cache_holds_a_quarter_of_the_bytes_and_reads_back_within_half_a_step() -> None:
    """int8 K/V with one fp32 scale per token and head (D = 64: 64 + 4 bytes against fp32's 256); a read hands
    back int8 x scale, each value within half a step of what was written, and storing what was read (the
    prefix cache's round trip) stores the same bytes again."""
    cache, plain = _narrow_and_plain(torch.int8)
    assert cache.capacity_bytes() * 256 == plain.capacity_bytes() * 68
    torch.manual_seed(0)
    seg, k = cache.hold(40), torch.randn(1, 3, 40, 64) * torch.logspace(-3, 3, 40)[None, None, :, None]
    k[0, 1, 7] = 0.0  # a token-head of zeros: scale 0
    cache.write(0, seg, 0, k, -k)
    back_k, back_v = cache.read(0, seg, 40)
    step = k.abs().amax(-1, keepdim=True) / 127
    assert back_k.dtype == torch.float32 and ((back_k - k).abs() <= step / 2 * 1.001).all()
    assert torch.equal(back_v, -back_k) and torch.equal(back_k[0, 1, 7], torch.zeros(64))
    again = cache.hold(40)
    cache.write(0, again, 0, back_k, back_v)
    blocks = blocks_for(40)
    assert torch.equal(cache.keys[0][:, again.start : again.start + blocks],
                       cache.keys[0][:, seg.start : seg.start + blocks])  # fmt: skip
    assert torch.equal(cache.values[0][:, again.start : again.start + blocks],
                       cache.values[0][:, seg.start : seg.start + blocks])  # fmt: skip


def test_a_bf16_cache_holds_half_the_bytes_and_reads_back_fp32() -> None:
    """The fast modes' cache stores K/V in bf16 where the kernel runs; reads hand back fp32 (the rounded values)."""
    cache, plain = _narrow_and_plain(torch.bfloat16)
    assert 2 * cache.capacity_bytes() == plain.capacity_bytes()
    seg, k = cache.hold(40), torch.randn(1, 3, 40, 64)
    cache.write(0, seg, 0, k, -k)
    back_k, back_v = cache.read(0, seg, 40)
    rounded = k.to(torch.bfloat16).float()
    assert back_k.dtype == torch.float32 and torch.equal(back_k, rounded) and torch.equal(back_v, -rounded)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_the_kernel_builds_where_there_is_a_compiler() -> None:
    """The fast path must not silently fall back (the torch path is ~5x slower)."""
    cache = RaggedCache(num_layers=1, max_tokens=64)
    cache.allocate(like(3, 64, 1), q_heads=9)
    assert cache.kernel is not None and cache.transposed


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernel_stores_prompt_tokens_as_the_torch_path_does(kv_dtype: torch.dtype | None) -> None:
    """A prompt pass's tokens (several segments, rows out of order, NaN-free extremes) go into the arena through
    the kernel's `put`; the bytes equal those of the torch path's cast and scatter into the same layout."""
    cache = RaggedCache(num_layers=1, max_tokens=1024, kv_dtype=kv_dtype)
    cache.allocate(like(3, 64, 1), q_heads=9)
    if cache.kernel is None:
        pytest.skip("no kernel here")
    segments = [cache.hold(n) for n in (70, 5, 300)]
    where = [cache.slots(seg, pos, n) for seg, pos, n in zip(segments, (0, 3, 17), (70, 2, 283), strict=True)]
    blk, slot = torch.cat([b for b, _ in where]), torch.cat([s for _, s in where])  # (T,)
    torch.manual_seed(0)
    k, v = torch.randn(blk.numel(), 3, 64) * 30, torch.randn(blk.numel(), 3, 64)  # (T, H, D)
    k[0, 0, :4] = torch.tensor([3.4e38, -3.4e38, 1e-40, -0.0])  # bf16 rounding at the range's ends
    cache.put(0, blk, slot, k, v)
    keys, values = torch.zeros_like(cache.keys[0]), torch.zeros_like(cache.values[0])
    keys[:, blk, :, slot] = k.to(cache.store)  # the torch path (RaggedCache.put without the kernel)
    values[:, blk, slot, :] = v.to(cache.store).transpose(0, 1)
    assert torch.equal(cache.keys[0].view(torch.int16 if kv_dtype else torch.int32),
                       keys.view(torch.int16 if kv_dtype else torch.int32))  # fmt: skip
    assert torch.equal(cache.values[0], values)


@pytest.mark.skipif(not torch.cpu.get_capabilities().get("avx512_f"), reason="runs both builds: needs AVX-512")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_the_avx2_build_of_the_decode_kernel_gives_the_avx512_builds_outputs(kv_dtype: torch.dtype) -> None:
    """Zen 2 runs the kernels built for AVX2 (8 floats a vector; int8 widened by its own intrinsic): an AVX-512
    CPU runs that build too. Same bytes stored, outputs to float rounding."""
    from app.models.kernels import compiled
    from app.models.layers import ragged_attention

    defines = {"H": 3, "G": 3, "D": 64, "CH": ragged_attention.CHUNK, **ragged_attention.kv_defines(kv_dtype)}
    def build(off: tuple[str, ...]) -> ragged_attention.DecodeAttentionKernel | None:
        return compiled.load(ragged_attention.SOURCE, "decode kernel",
                                 lambda p: ragged_attention.DecodeAttentionKernel(p, 3, 3, 64), defines,
                                 extra_flags=("-ffast-math", *off))  # fmt: skip

    kernels = [build(()), build(("-mno-avx512f",))]
    assert kernels[0] is not None and kernels[1] is not None
    torch.manual_seed(5)
    lengths = [3, 40, 300]
    outs, arenas = [], []
    for kernel in kernels:
        cache = RaggedCache(num_layers=1, max_tokens=1024, kv_dtype=kv_dtype)
        cache.allocate(like(3, 64, 1), q_heads=9)
        cache.kernel = kernel
        torch.manual_seed(5)
        segs = [cache.hold(n + 1) for n in lengths]
        for seg, n in zip(segs, lengths, strict=True):
            cache.write(0, seg, 0, torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64))
        q, new = torch.randn(3, 9, 1, 64), torch.randn(3, 3, 1, 64)
        outs.append(DecodeView(cache, segs, lengths).attend(0, nn.Module(), q, new, -new, 0.125))
        arenas.append((cache.keys[0].clone(), cache.values[0].clone()))
    assert torch.equal(arenas[0][0], arenas[1][0]) and torch.equal(arenas[0][1], arenas[1][1])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
def test_the_padded_window_holds_what_reads_hand_back(kv_dtype: torch.dtype | None) -> None:
    """The torch path's padded windows (Gemma's sliding-window layers attend over them): each row's tokens
    right-aligned, as `read` hands them back (int8: gathered token by token, times each token's scale)."""
    cache = RaggedCache(num_layers=1, max_tokens=1024, kv_dtype=kv_dtype)
    cache.allocate(like(3, 64, 1), q_heads=9)
    torch.manual_seed(2)
    lengths = [7, 40, 1]
    segs = [cache.hold(n) for n in lengths]
    for seg, n in zip(segs, lengths, strict=True):
        cache.write(0, seg, 0, torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64))
    keys, values = DecodeView(cache, segs, [n - 1 for n in lengths]).window(0)  # (B, H, W, D)
    assert keys.shape == (3, 3, 40, 64) and keys.dtype == torch.float32
    for row, (seg, n) in enumerate(zip(segs, lengths, strict=True)):
        k, v = cache.read(0, seg, n)  # (1, H, n, D)
        assert torch.equal(keys[row, :, 40 - n :], k[0]) and torch.equal(values[row, :, 40 - n :], v[0])


def test_an_unset_kv_budget_is_held_to_a_gib_of_the_cache(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import startup
    from app.config import Settings

    config = tiny.model.config  # fp32 K/V: 4 bytes an element
    assert token_bytes(tiny.model) == 2 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * 4
    assert token_bytes(tiny.model, "int8") == 2 * config.n_layer * config.n_head * (config.n_embd // config.n_head + 4)
    assert startup.engine_limits(Settings(), tiny.model).max_batch_tokens == 32768  # 16 MB: the default holds
    # a model whose 32,768 tokens would take more (a 7B shape: 8.8 GB) gets what the ceiling holds, not less than
    # the floor, unless the budget was set
    monkeypatch.setattr(startup, "KV_DEFAULT_BYTES", 4096 * token_bytes(tiny.model))
    assert startup.engine_limits(Settings(), tiny.model).max_batch_tokens == 4096
    monkeypatch.setattr(startup, "KV_DEFAULT_BYTES", 16 * token_bytes(tiny.model))
    assert startup.engine_limits(Settings(), tiny.model).max_batch_tokens == startup.KV_FLOOR_TOKENS
    assert startup.engine_limits(Settings(max_batch_tokens=32768), tiny.model).max_batch_tokens == 32768
    assert startup.engine_limits(Settings()).max_batch_tokens == 32768  # no model: the setting as it is
