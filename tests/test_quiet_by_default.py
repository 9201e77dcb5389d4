"""Normal calls on the expected path are quiet: no autoflash warning, and no warning of transformers'
(a deprecated attribute read, say) that the same calls do not raise without autoflash."""

from __future__ import annotations

import logging
import warnings

import torch

from conftest import labels_for, model_pair, padding_mask


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _everything_said(model, ids, mask):
    """(Python warnings, log records at WARNING or above of autoflash and transformers) of a padded training
    step, a padded evaluation and a left-padded generate()."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("autoflash", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.train()
            model(ids, attention_mask=mask, labels=labels_for(ids, mask)).loss.backward()
            model.eval()
            with torch.no_grad():
                model(ids, attention_mask=mask)
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    said = {f"{w.category.__name__}: {w.message}" for w in caught}
    said |= {f"{r.name} {r.levelname}: {r.getMessage()}" for r in handler.records if r.levelno >= logging.WARNING}
    return said


def test_training_evaluation_and_generation_say_nothing_that_transformers_alone_does_not():
    fast, eager = model_pair(seed=51)
    mask = padding_mask([7, 4, 2], "left")
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(3)).masked_fill(mask == 0, 0)
    # transformers' one-time notices are said in the first run only: eager's takes those both would cause
    theirs = _everything_said(eager, ids, mask)
    ours = _everything_said(fast, ids, mask)
    assert ours <= theirs, ours - theirs
    assert not [s for s in ours if s.startswith("autoflash")]
