"""The transformers matrix: one virtual environment per release autoflash supports.

    nox                 # every session (what .ci/run does)
    nox -s "tests(transformers='4.37.2')"   # one of them
    nox -l              # the list

Each session installs the CPU build of torch that CI uses, one transformers release (with
the tokenizers / huggingface-hub pins that release needs), and autoflash, then runs the
equivalence tests: outputs and gradients against eager in float32, greedy generation
token for token, packed sequences, the patch policy, the fallbacks and start-up. The plain
test command (README) runs the current environment only.
"""

import nox

nox.options.reuse_venv = "yes"

TORCH = "torch==2.13.0"
RELEASES = {
    # InternVL's pin; attention classes (LlamaFlashAttention2._flash_attention_forward method)
    "4.37.2": ["transformers==4.37.2", "tokenizers>=0.14,<0.19", "huggingface-hub<1.0"],
    # the last release before AttentionInterface (module-level _flash_attention_forward)
    "4.47.1": ["transformers==4.47.1", "tokenizers>=0.21,<0.22", "huggingface-hub<1.0"],
    # AttentionInterface without mask functions: flash_attention_2 routed in the LLaMA module
    "4.50.3": ["transformers==4.50.3", "tokenizers>=0.21,<0.22", "huggingface-hub<1.0"],
    # the last 4.x release
    "4.57.6": ["transformers==4.57.6", "tokenizers>=0.22,<0.23", "huggingface-hub<1.0"],
    # the GPU machine's release
    "5.17.0": ["transformers==5.17.0"],
    "5.24.0": ["transformers==5.24.0"],
    # the latest 5.x when this matrix was last updated (continuous batching, the Trainer's context parallelism)
    "5.25.0": ["transformers==5.25.0"],
}
TESTS = ["tests/test_training_matches_eager.py", "tests/test_packed_sequences.py", "tests/test_tracing.py",
         "tests/test_generation_matches_eager.py",
         "tests/test_whole_model_padding_removal.py", "tests/test_layout.py", "tests/test_patch_policy.py",
         "tests/test_backend_choice.py", "tests/test_startup.py", "tests/test_never_worse.py",
         "tests/test_quiet_by_default.py", "tests/test_distributed.py", "tests/test_families.py",
         "tests/test_deterministic_backward.py", "tests/test_sdpa_by_sequence.py",
         "tests/test_handed_to_transformers.py",
         # every causal LM of the release's registry against eager (skipped before the attention-interface era)
         "tests/test_other_decoders.py",
         # vision-language models with images: their language models on the packed row, their head and loss
         "tests/test_vision_language_models.py"]


@nox.session
@nox.parametrize("transformers", list(RELEASES))
def tests(session, transformers):
    session.install(TORCH, *RELEASES[transformers])
    session.install("--no-deps", "-e", ".")
    # psutil: continuous batching sizes its cache from the host's memory (5.17 raises MemoryError without it)
    session.install("pytest", "hypothesis", "wrapt", "psutil")
    session.run("python", "-c", "import transformers, torch; print('transformers', transformers.__version__, "
                "'torch', torch.__version__)")
    session.run("python", "-m", "pytest", "-q", *TESTS)
