"""Small helpers shared by the library's traced code."""


def top_tokens(probabilities, k):
    """The ``k`` most likely token ids of a probability vector, with their probabilities."""
    values, indices = probabilities.detach().topk(k)
    return [(int(index), round(float(value), 4)) for index, value in zip(indices, values)]


def logit_difference(logits, correct, wrong):
    """How much more the model prefers token ``correct`` over token ``wrong``."""
    return float(logits[correct].detach() - logits[wrong].detach())
