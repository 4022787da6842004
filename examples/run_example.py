"""The main job: run the example research library through the sourcebox worker.

Starts a worker hosting the embedded tiny GPT-2 under the default policy, routes
nnsight's ``remote='local'`` to it, and runs a logit lens, activation patching and a
running-statistics probe, all written as an ordinary user package (research_lib) that
the worker cannot import.
"""

import time

from nnsight import TransformersModel
import runner
import runner.nnsight

import research_lib

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model reads a sequence of tokens.",
    "The weather today is sunny with a light breeze.",
    "Researchers open the model and read its hidden states.",
]


def main():
    started = time.monotonic()
    with runner.Worker(model="tiny-gpt2") as worker:
        print(f"worker ready in {time.monotonic() - started:.1f} s (policy {worker.policy.name!r})")
        runner.nnsight.install(worker)
        model = TransformersModel(runner.models.path("tiny-gpt2"), task="text-generation")

        print("\nLogit lens on 'The Eiffel Tower is in': top guesses per layer")
        for depth, guesses in enumerate(research_lib.logit_lens(model, "The Eiffel Tower is in")):
            name = f"layer {depth}" if depth < len(model.transformer.h) else "output "
            print(f"  {name}: " + ", ".join(f"{token!r} {probability:.3f}" for token, probability in guesses))

        clean, corrupted = "The Colosseum is in Rome", "The Colosseum is in Paris"
        clean_difference, corrupted_difference, restored = research_lib.patch_last_position(
            model, clean, corrupted, correct=" the", wrong=" is")
        print(f"\nActivation patching, {clean!r} into {corrupted!r}")
        print(f"  logit difference ' the' - ' is': clean {clean_difference:+.4f}, corrupted {corrupted_difference:+.4f}")
        for depth, fraction in enumerate(restored):
            print(f"  patching layer {depth} restores {fraction:6.1%} of the clean difference")

        probe = research_lib.RunningStats(layer=1, width=model.config.n_embd)
        for prompt in PROMPTS:
            probe.observe(model, prompt)
        print(f"\nRunning statistics of layer 1 over {probe.count} token positions from {len(PROMPTS)} prompts")
        print(f"  mean activation norm {float(probe.mean.norm()):.4f}, mean variance {float(probe.variance.mean()):.4f}")
        for prompt in ("Hello world.", "zzzz qqqq xxxx"):
            print(f"  surprise of {prompt!r}: {probe.surprise(model, prompt):.3f} (mean |z|)")

        runner.nnsight.uninstall()
    print(f"\ndone in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
