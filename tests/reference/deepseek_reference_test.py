"""moed's DeepSeek forward pass against the independent float64 numpy reference
(deepseek_reference.py) on small synthesized checkpoints: V3's sigmoid routing with the
correction bias and group-limited top-k, V2's group-limited greedy, the low-rank query and
YaRN, the forms ../shared/golden-next does not cover. Logits within 1e-4, at every prompt
position and through the KV cache for a greedy continuation.

With --golden DIR it checks the reference itself against golden-next's llama.cpp logits.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_reference as ref  # noqa: E402

TOLERANCE = 1e-4

# name, moed-synth arguments, what the variant must exercise
VARIANTS = [
    ("v3-noaux-qlora", ["--arch", "deepseek_v3", "--preset", "tiny", "--seed", "3"],
     {"groups", "bias"}),
    ("v3-yarn", ["--arch", "deepseek_v3", "--preset", "tiny", "--seed", "4", "--yarn-factor", "4"],
     {"groups", "bias", "yarn"}),
    ("v2-group-limited-qlora-yarn",
     ["--arch", "deepseek_v2", "--preset", "tiny", "--seed", "5", "--experts", "16",
      "--top-k", "3", "--topk-method", "group_limited_greedy", "--groups", "4",
      "--top-groups", "2", "--q-lora-rank", "40", "--yarn-factor", "8"],
     {"groups", "yarn"}),
    ("v2-renormalized", ["--arch", "deepseek_v2", "--preset", "tiny", "--seed", "6",
                         "--norm-topk-prob", "true", "--dense-layers", "0"], set()),
]


def max_abs_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(theirs))))


def check_golden(golden_dir):
    config, weights = ref.load(golden_dir)
    with open(os.path.join(golden_dir, "cases.json")) as f:
        cases = json.load(f)["cases"]
    worst = 0.0
    for case in cases:
        tokens = case["prompt"] + case["greedy"][:-1]
        logits = ref.forward(config, weights, tokens)
        expected = case["prompt_logits"] + case["greedy_logits"][:-1]
        worst = max(worst, max_abs_diff(logits, expected))
        assert list(np.argmax(logits[len(case["prompt"]) - 1 :], axis=-1)) == case["greedy"], \
            "the reference's greedy ids differ from golden-next's"
    print(f"reference vs golden-next/deepseek_v2 (llama.cpp): max |diff| {worst:.2e}")
    assert worst <= TOLERANCE, f"the reference is {worst} from llama.cpp's logits"


def check_variant(synth, moectl, workdir, name, args, exercised):
    model_dir = os.path.join(workdir, name)
    subprocess.run([synth, "--out", model_dir, *args], check=True, stdout=subprocess.DEVNULL)
    config, weights = ref.load(model_dir)
    prompt = [int(t) for t in np.random.default_rng(len(name)).integers(0, 500, size=70)]
    greedy_steps = 6
    run = subprocess.run(
        [moectl, "logits", "--model", model_dir, "--backend", "cpu", "--threads", "2",
         "--tokens", ",".join(map(str, prompt)), "--greedy", str(greedy_steps)],
        check=True, capture_output=True, text=True)
    ours = json.loads(run.stdout)
    tokens = prompt + ours["greedy"][:-1]
    trace = []
    logits = ref.forward(config, weights, tokens, trace)
    moed_logits = ours["prompt_logits"] + ours["greedy_logits"][:-1]
    worst = max_abs_diff(moed_logits, logits)
    # Greedy ids: the reference's argmax wherever its top two are clearly apart.
    for step, token in enumerate(ours["greedy"]):
        row = logits[len(prompt) - 1 + step]
        top = np.sort(row)[-2:]
        if top[1] - top[0] > 10 * TOLERANCE:
            assert int(np.argmax(row)) == token, f"{name}: greedy step {step} differs"
    # The variant's features change the outcome, so a fault in them could not pass unseen.
    if "groups" in exercised:
        assert any((t["chosen"] != t["without_groups"]).any() for t in trace), \
            f"{name}: the group limit never changed a choice"
    if "bias" in exercised:
        assert any((t["chosen"] != t["without_bias"]).any() for t in trace), \
            f"{name}: the correction bias never changed a choice"
    if "yarn" in exercised:
        assert config["rope_scaling"]["type"] == "yarn"
    print(f"{name}: {len(prompt)} prompt positions and {greedy_steps} greedy steps, "
          f"max |diff| {worst:.2e}")
    assert worst <= TOLERANCE, f"{name}: moed is {worst} from the reference"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--synth")
    parser.add_argument("--moectl")
    parser.add_argument("--golden")
    options = parser.parse_args()
    if options.golden:
        check_golden(options.golden)
        return
    with tempfile.TemporaryDirectory(prefix="moed_deepseek_reference_") as workdir:
        for name, args, exercised in VARIANTS:
            check_variant(options.synth, options.moectl, workdir, name, args, exercised)


if __name__ == "__main__":
    main()
