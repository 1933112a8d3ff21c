import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from app.engine.sampling import SampleRow, apply_repetition_penalty, apply_top_k, apply_top_p, sample, seen_mask
from app.engine.types import SamplingParams

V = 1000


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(seed: int | None = None, history: tuple[int, ...] = (), **params: float) -> SampleRow:
    p = SamplingParams(do_sample=True, seed=seed, **params)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRow(p, gen, seen_mask(history, V, torch.device("cpu")) if history else None)


def test_greedy_rows_take_the_argmax() -> None:
    x = logits(4)
    rows = [SampleRow(SamplingParams(), None) for _ in range(4)]
    assert sample(x, rows) == x.argmax(-1).tolist()


def test_top_k_and_top_p_match_transformers_warpers_per_row() -> None:
    x = logits(3)
    ks = torch.tensor([1, 5, 50])
    ours = apply_top_k(x.clone(), ks)
    for i, k in enumerate(ks.tolist()):
        theirs = TopKLogitsWarper(top_k=k)(None, x[i : i + 1].clone())
        assert torch.equal(ours[i : i + 1], theirs)
    ps = torch.tensor([0.1, 0.5, 0.95])
    ours = apply_top_p(x.clone(), ps)
    for i, p in enumerate(ps.tolist()):
        theirs = TopPLogitsWarper(top_p=p)(None, x[i : i + 1].clone())
        assert torch.equal(torch.isinf(ours[i : i + 1]), torch.isinf(theirs))


def test_repetition_penalty_matches_transformers() -> None:
    x = logits(2)
    hist = [[1, 2, 3, 3, 999], [5, 6]]
    rows = [row(0, tuple(hist[0]), repetition_penalty=1.3), row(1, tuple(hist[1]), repetition_penalty=0.7)]
    ours = apply_repetition_penalty(x.clone(), rows)
    for i, (h, pen) in enumerate(zip(hist, (1.3, 0.7), strict=True)):
        theirs = RepetitionPenaltyLogitsProcessor(penalty=pen)(torch.tensor([h]), x[i : i + 1].clone())
        assert torch.allclose(ours[i : i + 1], theirs)


def test_seeded_row_draws_do_not_depend_on_batch_mates() -> None:
    x = logits(1, seed=3)
    # the same seeded row, sampled 10 times alone and 10 times among other rows
    solo, mixed = row(seed=42, temperature=0.9), row(seed=42, temperature=0.9)
    others = [row(seed=s, temperature=1.5, top_k=5) for s in range(3)]
    batch = torch.cat([logits(2, seed=9)[:1], x, logits(2, seed=9)[1:], x])  # (4, V)
    solo_draws = [sample(x, [solo])[0] for _ in range(10)]
    mixed_draws = [sample(batch, [others[0], mixed, others[1], others[2]])[1] for _ in range(10)]
    assert solo_draws == mixed_draws
    assert len(set(solo_draws)) > 1  # it really samples


def test_sampling_follows_the_distribution_and_temperature() -> None:
    # Two tokens with probabilities 0.25 / 0.75 at temperature 1; at temperature 0.5 they become
    # 1/10 and 9/10 (p^2 renormalised). Draw frequencies must match both.
    x = torch.full((1, V), float("-inf"))
    x[0, 7], x[0, 9] = 0.0, float(torch.log(torch.tensor(3.0)))
    for temperature, expected in ((1.0, 0.75), (0.5, 0.9)):
        r = row(seed=0, temperature=temperature)
        draws = [sample(x, [r])[0] for _ in range(4000)]
        assert set(draws) == {7, 9}
        assert abs(draws.count(9) / len(draws) - expected) < 0.03


def test_top_k_one_is_greedy_even_when_sampling() -> None:
    x = logits(5)
    rows = [row(seed=s, top_k=1, temperature=2.0) for s in range(5)]
    assert sample(x, rows) == x.argmax(-1).tolist()


def test_a_rows_top_k_holds_beside_rows_without_one() -> None:
    x = logits(2)
    rows = [row(seed=0, top_k=3), row(seed=1)]  # the second row has no top-k (all of the vocabulary)
    draws = {sample(x, rows)[0] for _ in range(200)}
    assert draws <= set(torch.topk(x[0], 3).indices.tolist()) and len(draws) > 1


def test_the_penalty_mask_follows_the_sequence_and_matches_transformers() -> None:
    x = logits(3)
    penalized = row(0, (4, 8, 8, 15), repetition_penalty=1.5)
    rows = [SampleRow(SamplingParams(), None), penalized, row(2, (1, 2), repetition_penalty=1.0)]
    ours = apply_repetition_penalty(x.clone(), rows)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=1.5)(torch.tensor([[4, 8, 8, 15]]), x[1:2].clone())
    assert torch.equal(ours[1:2], theirs) and torch.equal(ours[0], x[0]) and torch.equal(ours[2], x[2])
