#!/usr/bin/python3
"""Writes a routing trace (../shared/traces format) in which every token picks its top-k
experts of every layer uniformly at random, independently: routing with no locality at all,
the worst case for an expert cache, for models no recorded trace fits.

  tools/bench/uniform_routing_trace.py --layers 27 --experts 64 --top-k 6 --tokens 64 > t.jsonl
"""

import argparse
import json
import random


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--experts", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    for sequence in range(options.sequences):
        tokens, weights = [], []
        for _ in range(options.tokens):
            tokens.append([rng.sample(range(options.experts), options.top_k)
                           for _ in range(options.layers)])
            # Descending weights summing to 1, as a renormalised router's.
            layer_weights = []
            for _ in range(options.layers):
                raw = sorted((rng.random() for _ in range(options.top_k)), reverse=True)
                total = sum(raw)
                layer_weights.append([round(w / total, 6) for w in raw])
            weights.append(layer_weights)
        print(json.dumps({
            "model": "uniform random routing", "num_layers": options.layers,
            "num_experts": options.experts, "top_k": options.top_k,
            "source": "tools/bench/uniform_routing_trace.py", "task": f"uniform-{sequence}",
            "num_prefill_tokens": 0, "num_decode_tokens": options.tokens,
            "tokens": tokens, "weights": weights,
        }))


if __name__ == "__main__":
    main()
