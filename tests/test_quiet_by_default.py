"""Normal calls on the expected path are quiet: no autoflash warning, and no warning of transformers'
(a deprecated attribute read, say) that the same calls do not raise without autoflash."""

from __future__ import annotations

import logging
import warnings

import torch

from _subprocess import run_python
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


def test_warnings_read_once_named_under_the_applications_logging_and_without_it():
    """Under logging.basicConfig() a warning reads in the application's format, naming autoflash once
    ("WARNING:autoflash:..."); where nothing is configured it still says it comes from autoflash."""
    code = """
        import logging, os
        if os.environ["LOGGING_UNDER_TEST"] == "configured":
            logging.basicConfig()
        import torch, autoflash
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
        LlamaForCausalLM(config)(torch.randint(0, 50, (1, 5)), output_attentions=True)
    """
    # (the warning's words differ by era: transformers < 4.48 gives no weights at all)
    configured = [line for line in run_python(code, env={"LOGGING_UNDER_TEST": "configured"}).stderr.splitlines()
                  if "autoflash" in line]
    assert len(configured) == 1 and configured[0].startswith("WARNING:autoflash:output_attentions=True "), configured
    bare = [line for line in run_python(code, env={"LOGGING_UNDER_TEST": "none"}).stderr.splitlines()
            if "autoflash" in line]
    assert len(bare) == 1 and bare[0].startswith("autoflash: output_attentions=True "), bare


def test_what_is_said_once_is_said_once_per_key_and_a_topic_can_start_over(caplog):
    import logging

    from autoflash.settings import forget_said, say_once

    with caplog.at_level(logging.INFO, logger="autoflash"):
        said = [say_once(("a topic", 1), logging.INFO, "first %s", 1), say_once(("a topic", 1), logging.INFO, "again"),
                say_once(("a topic", 2), logging.INFO, "another key"), say_once(("other", 1), logging.INFO, "other")]
        forget_said("a topic")
        said += [say_once(("a topic", 1), logging.INFO, "after forgetting"), say_once(("other", 1), logging.INFO, "no")]
    assert said == [True, False, True, True, True, False]
    assert [r.getMessage() for r in caplog.records] == ["first 1", "another key", "other", "after forgetting"]
    forget_said("a topic", "other")
