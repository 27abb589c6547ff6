"""Quality of weight-only quantization against the float model it came from.

For each mode (int8, int4 with groups of 32 and 128, fp8): top-1 agreement of the next-token argmax over every
position of an English text, mean KL(p_float || p_quant), and the perplexity of both models on the text.
Models: the bundled default (SmolLM2-135M, fp32) on two texts, the tiny random Grok-2 of the tests, and a random
Grok-2-shaped model with hidden size 1024 (random weights: agreement and KL there say how much the
quantization perturbs the function, perplexity says nothing).

Run: .venv/bin/python benchmarks/quant_quality.py [--only default|tiny|wide]
Prints a markdown table, writes benchmarks/results/quant_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from grokstack.quant import model_bytes, quality, quantize_model
from grokstack.tiny import random_model, tiny_config

SAMPLE = """\
The lighthouse stood on a spit of black rock at the mouth of the harbour, and for ninety years a keeper had \
climbed its spiral stairs every evening to light the lamp. The last keeper was a quiet woman named Agnes, who \
kept a logbook in a careful hand: the weather at dawn and dusk, the ships that passed, the birds that rested on \
the gallery rail during storms. When the lamp was automated, the harbour authority offered her a cottage in the \
town, but she asked to stay, and nobody had the heart to refuse.

In the mornings she walked along the shore collecting driftwood, which she dried in the lamp room and burned in \
a small iron stove. In the afternoons she read. The town library sent her a box of books each month, chosen by \
a librarian who had never met her but who had learned her tastes from the notes she tucked into the returns: \
more history, fewer novels about lawyers, anything at all about the sea.

Scientists sometimes visited to check the instruments on the roof. They measured wind speed, air pressure and \
the height of the waves, and they sent the numbers to a computer on the mainland that predicted the weather for \
fishermen up and down the coast. Agnes liked the scientists. They were young and always hungry, and they \
listened when she told them that the forecast was wrong, which it often was, because the computer did not know \
that fog gathers in the channel whenever the wind turns to the south-east after a warm day.

One winter a storm broke the power line to the island. For three nights the automatic lamp was dark, and on \
the third night a small cargo ship lost its way in the rain. Agnes heard its horn, climbed the stairs with a \
paraffin lantern and a mirror from her bathroom, and signalled from the gallery until the ship turned away from \
the rocks. The captain wrote to the newspaper afterwards. He said that in thirty years at sea he had never been \
so glad to see such a small light.
"""

# A second, expository sample: confident predictions, so fewer near-ties for top-1 agreement to flip.
FACTS = """\
A bicycle turns the push of the rider's legs into forward motion. The pedals turn a toothed wheel called the \
chainring, and a chain carries the motion to a smaller wheel, the sprocket, fixed to the rear hub. Because the \
sprocket has fewer teeth than the chainring, the back wheel turns several times for each turn of the pedals. Gears \
let the rider change this ratio: a low gear makes climbing a hill easier, and a high gear makes the bicycle faster \
on flat ground. The brakes press rubber pads against the rim or a disc, and friction turns the motion into heat.

The Moon orbits the Earth about once every twenty-seven days. It does not make its own light; we see it because \
it reflects light from the Sun. As it moves around the Earth, we see different amounts of its sunlit side, which \
is why its shape seems to change from a thin crescent to a full disc and back again. The pull of the Moon's \
gravity on the oceans causes the tides, which rise and fall twice a day along most coasts.
"""

MODES = [("int8", 128), ("int4", 32), ("int4", 128), ("fp8", 128)]


def wide_config():
    """Grok-2's shape (sandwich norms, residual MoE, 8 experts top-2) at hidden size 1024."""
    return tiny_config(
        "grok-2",
        vocab_size=4096, hidden_size=1024, num_hidden_layers=4, head_dim=128, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=2048, moe_intermediate_size=1024, max_position_embeddings=1024,
        attn_temperature_len=64,
    )


def models(only: str | None):
    """(name, float model, token ids [1, T]) for each model asked for."""
    if only in (None, "default"):
        import grokstack

        lm = grokstack.load("default")
        yield "default, story", lm.model, torch.tensor([lm.encode(SAMPLE)])
        yield "default, facts", lm.model, torch.tensor([lm.encode(FACTS)])
    g = torch.Generator().manual_seed(1)
    if only in (None, "tiny"):  # random weights: any ids will do, but no pad (id 0)
        ids = torch.randint(3, 512, (1, 200), generator=g)
        yield "tiny Grok-2 (random, D=64)", random_model(tiny_config("grok-2")), ids
    if only in (None, "wide"):
        ids = torch.randint(3, 4096, (1, 400), generator=g)
        yield "Grok-2-shaped (random, D=1024)", random_model(wide_config()), ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["default", "tiny", "wide"])
    args = ap.parse_args()
    rows = []
    print("| model | mode | top-1 agree | mean KL (nats) | ppl float | ppl quant | MiB | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, model, ids in models(args.only):
        model.eval()
        with torch.no_grad():
            ref = model(ids)
        print(f"| {name} | float | 1.0000 | 0 | | | {model_bytes(model) / 2**20:.0f} | |", flush=True)
        for mode, group in MODES:
            t = time.perf_counter()
            q = quantize_model(copy.deepcopy(model), mode, group)
            r = quality(None, q, ids, ref_logits=ref)
            label = f"{mode} g={group}" if mode == "int4" else mode
            rows.append({"model": name, "mode": label, **r, "bytes": model_bytes(q), "tokens": ids.shape[1]})
            print(f"| {name} | {label} | {r['top1']:.4f} | {r['kl']:.5f} | {r['ppl_ref']:.2f} | {r['ppl_quant']:.2f} "
                  f"| {model_bytes(q) / 2**20:.0f} | {time.perf_counter() - t:.1f} |", flush=True)
            del q
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "quant_quality.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
