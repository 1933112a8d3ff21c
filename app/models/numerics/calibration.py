"""Activation ranges for SmoothQuant, measured on a short built-in text at load.

int8 activations get one scale per row, so the few input channels whose activations are far larger than
the rest decide the scale and the other channels lose precision. SmoothQuant (Xiao et al., 2023) divides
input channel k by s[k] = max|x_k|^alpha / max|W[:, k]|^(1 - alpha) and multiplies the weight's column k by
it: the product is unchanged, the activations are flatter and the weights, quantized per output channel,
take the difference well.

max|x_k| is a property of the model more than of the text (the outlier channels are the same for any
input), so a couple of thousand tokens of varied text of our own are enough: no data set is needed at
load. The text below was written for this purpose; it is not taken from any evaluation set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Migration strength. The paper's default is 0.5; on SmolLM2 (WikiText-2 valid, 40 x 512 tokens, int8 everywhere
# but the down projections and the output layer) 0.5 gave +0.80% perplexity over fp32, 0.7 +0.48%, 0.85 +0.67%.
ALPHA = 0.7

TEXT = """\
The harbour was quiet at dawn. Fishing boats came in one by one, their engines slowing as they passed the
breakwater, and the gulls followed them in long, lazy circles. By seven the market was open: crates of
mackerel and crab on ice, a man shouting prices, a child holding her grandmother's hand and staring at a
lobster that still moved.

Q: What is the boiling point of water at sea level?
A: 100 degrees Celsius, or 212 degrees Fahrenheit.

def mean(values):
    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"
    return sum(values) / len(values)

Dear Ms. Alvarez, thank you for your letter of 14 March. I am pleased to confirm that your order (No. 58213)
has been shipped and should arrive within five working days. Please do not hesitate to contact us if you
have any questions.

The committee met on Tuesday to discuss the budget for 2024-2025. Revenue rose 3.2% to $41.7 million, while
costs grew faster than expected, mostly because of energy prices. Members agreed to postpone two projects
and to review the plan again in the autumn.

"I don't think that's a good idea," she said, putting down her cup. "We tried it last year and it didn't work."
He shrugged. "Things change. People change. Maybe this time it will."

Photosynthesis converts light energy into chemical energy. In the chloroplasts, water is split, oxygen is
released, and carbon dioxide is fixed into sugars through the Calvin cycle. The overall reaction can be
written as 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.

Ingredients: 200 g flour, 2 eggs, 300 ml milk, a pinch of salt, butter for the pan. Whisk the flour, eggs and
salt, add the milk slowly until the batter is smooth, and let it rest for half an hour before cooking.

La ville est calme le dimanche matin. Die Kinder spielen im Park, und die Sonne scheint.
This movie was a complete waste of time: the plot made no sense and the acting was wooden.
What a wonderful surprise! The service was friendly, the food was excellent and the prices were fair.

In 1869 the Suez Canal opened, shortening the sea route between Europe and Asia by thousands of kilometres.
Its construction took ten years and employed tens of thousands of workers, many of them under forced labour.
TL;DR: the canal changed world trade.
"""


def calibration_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of the calibration text as plain text, and once more inside the chat template if the model has
    one (chat requests start with the template's special tokens, whose activations differ)."""
    texts = [tokenizer(TEXT, add_special_tokens=True).input_ids]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": TEXT[:1200]}, {"role": "assistant", "content": TEXT[1200:2400]}]
        texts.append(list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)))
    return texts


def input_ranges(model: Any, layers: list[nn.Module], samples: list[list[int]]) -> dict[int, torch.Tensor]:
    """max |x_k| per input channel (K,) seen by each layer over `samples`, keyed by id(layer)."""
    ranges: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        seen = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)  # (K,)
        key = id(module)
        ranges[key] = seen if key not in ranges else torch.maximum(ranges[key], seen)

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in samples:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return ranges


def smoothing(x_range: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s (K,) for activations ranging over `x_range` (K,) and a weight
    (N, K): x / s and W * s."""
    w_range = weight.detach().float().abs().amax(dim=0)  # (K,)
    s = x_range.clamp_min(1e-5).pow(alpha) / w_range.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp(1e-2, 1e2)  # (K,)
