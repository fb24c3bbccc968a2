"""The transformers generator backend on a real tiny model: n samples per prompt, seeding, and a real peft adapter."""

from __future__ import annotations

import pytest

from spogw.generation import Generator, TransformersGenerator, generator_messages, make_generator

PROMPTS = [[{"role": "user", "content": "Write a workflow."}],
           [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Solve 1 + 1."}]]


def test_n_samples_per_prompt_seeded(tiny_model):
    gen = TransformersGenerator(tiny_model, batch_size=4)
    assert isinstance(gen, Generator)
    out = gen.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=1)
    assert [len(samples) for samples in out] == [3, 3]
    assert all(isinstance(s, str) and s for samples in out for s in samples)
    assert len(set(out[0])) > 1  # sampled, not copies
    assert gen.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=1) == out
    assert gen.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=2) != out
    greedy = gen.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=6)
    assert all(a == b for a, b in greedy)
    assert gen.stats.batches >= 4 and gen.stats.generated_tokens > 0 and max(gen.stats.batch_sizes) == 4


def test_loads_a_peft_adapter_and_it_changes_the_output(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from spogw.models import load_causal_lm

    model = get_peft_model(load_causal_lm(tiny_model), LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    base = TransformersGenerator(tiny_model).generate(PROMPTS, max_new_tokens=16)
    tuned = make_generator(tiny_model, str(tmp_path / "adapter"))
    assert "adapter" in tuned.identity
    assert tuned.generate(PROMPTS, max_new_tokens=16) != base


def test_bad_adapter_and_sampling_options_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="--adapter .*adapter_config.json"):
        TransformersGenerator(tiny_model, adapter=str(tmp_path)).generate(PROMPTS, max_new_tokens=2)
    gen = TransformersGenerator(tiny_model)
    for kwargs, flag in (({"n": 0}, "`n`"), ({"temperature": -1.0}, "`temperature`"), ({"top_p": 0.0}, "`top_p`"),
                         ({"max_new_tokens": 0}, "`max_new_tokens`")):
        with pytest.raises(ValueError, match=flag):
            gen.generate(PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="`--generation.backend` must be one of transformers, engine, vllm"):
        make_generator(tiny_model, backend="tgi")


@pytest.mark.parametrize("family", ["code", "math", "qa"])
def test_generator_prompt_shows_the_operators_template_and_question(family):
    from spogw.workflows.families import load_family

    (message,) = generator_messages(family, "QUESTION-XYZ")
    spec = load_family(family)
    assert message["role"] == "user" and "QUESTION-XYZ" in message["content"]
    assert spec.template.strip() in message["content"]
    assert all(op in message["content"] for op in spec.offered)


def test_the_vllm_backend_is_dispatched_by_name_without_importing_vllm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` would raise: construction must not need it
    gen = make_generator("embedded", backend="vllm")
    assert isinstance(gen, Generator) and gen.identity.startswith("vllm:embedded")
