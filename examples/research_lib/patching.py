"""Activation patching: which layer carries the information that decides the answer?"""

import nnsight

from .text import logit_difference


def _answer_logits(model, prompt, patch_layer=None, patch=None):
    with model.trace(prompt, remote="local"):
        if patch_layer is not None:
            model.transformer.h[patch_layer].output[:, -1] = patch
        logits = model.lm_head.output[0, -1].save()
    return logits


def patch_last_position(model, clean, corrupted, correct, wrong):
    """Patch each layer's last-position state from the clean run into the corrupted run.

    Returns the clean and corrupted logit differences (``correct`` over ``wrong``) and,
    per layer, the fraction of the clean difference that the patch restores.
    """
    correct_id = model.tokenizer(correct)["input_ids"][0]
    wrong_id = model.tokenizer(wrong)["input_ids"][0]
    layers = model.transformer.h
    with model.trace(clean, remote="local"):
        clean_states = nnsight.save([layer.output[:, -1] for layer in layers])
        clean_logits = model.lm_head.output[0, -1].save()

    clean_difference = logit_difference(clean_logits, correct_id, wrong_id)
    corrupted_difference = logit_difference(_answer_logits(model, corrupted), correct_id, wrong_id)
    span = clean_difference - corrupted_difference
    restored = []
    for index, state in enumerate(clean_states):
        patched = logit_difference(_answer_logits(model, corrupted, index, state), correct_id, wrong_id)
        restored.append((patched - corrupted_difference) / span if span else 0.0)
    return clean_difference, corrupted_difference, restored
