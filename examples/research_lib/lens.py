"""The logit lens: read each layer's residual stream through the model's own unembedding."""

from .text import top_tokens


def logit_lens(model, prompt, top_k=3):
    """For each layer, the ``top_k`` next-token guesses (token, probability) at the last position.

    Each layer's hidden state goes through the final layer norm and the unembedding,
    as if the model stopped there.
    """
    layers = model.transformer.h
    with model.trace(prompt, remote="local"):
        probabilities = []
        for layer in layers:
            hidden = layer.output[:, -1]
            logits = model.lm_head(model.transformer.ln_f(hidden))
            probabilities.append(logits.softmax(-1)[0])
        final = model.lm_head.output[0, -1].softmax(-1)
        probabilities.append(final)
        guesses = [top_tokens(p, top_k) for p in probabilities]
        guesses.save()
    return [[(model.tokenizer.decode([index]), probability) for index, probability in row] for row in guesses]
