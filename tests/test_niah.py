"""benchmarks/niah.py on a tiny model: configurations, prompts, grading and the table."""

import importlib.util
import os

import pytest

from mlx_lm.utils import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def niah():
    spec = importlib.util.spec_from_file_location(
        "niah", os.path.join(REPO, "benchmarks", "niah.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_config(niah):
    assert niah.parse_config("fp16") == {}
    assert niah.parse_config("tq3") == {"turbo_kv_bits": 3}
    assert niah.parse_config("tqK8V3") == {"turbo_key_bits": 8, "turbo_value_bits": 3}
    assert niah.parse_config("tq4-w0-noscale") == {
        "turbo_kv_bits": 4,
        "turbo_fp16_window": 0,
        "turbo_key_scaling": False,
    }
    assert niah.parse_config("tq3-plain") == {
        "turbo_kv_bits": 3,
        "turbo_key_centering": False,
        "turbo_key_scaling": False,
        "turbo_fp16_window": 0,
    }
    assert niah.parse_config("kv4")["kv_bits"] == 4
    for bad in ("tq", "tq3-w", "fp8", "tqK8"):
        with pytest.raises(ValueError, match="Unknown cache configuration"):
            niah.parse_config(bad)


def test_prompts_grid_and_grading(niah, tiny_model_dir, monkeypatch):
    model, tokenizer = load(tiny_model_dir)
    haystack = niah.haystack_text()
    assert haystack.split("\n\n")[0].count(". ") >= 2  # starts with running prose
    filler = tokenizer.encode(haystack)
    for depth in (0.0, 0.5, 1.0):
        ids = niah.build_prompt(tokenizer, filler, 1500, depth, "12345")
        text = tokenizer.decode(ids)
        assert "The passkey is 12345." in text and text.count("12345") == 2
        assert abs(len(ids) - 1500) <= 30, len(ids)
        start, end = text.index(niah.INTRO.strip()) + len(niah.INTRO), text.index(
            niah.QUESTION.strip()
        )
        where = (text.index("The passkey") - start) / (end - start)
        assert abs(where - depth) < 0.2, (depth, where)
    with pytest.raises(ValueError, match="filler text has"):
        niah.build_prompt(tokenizer, filler[:100], 1500, 0.5, "12345")

    # A tiny random model does not find the passkey: every cell is 0%.
    grid = niah.run_grid(model, tokenizer, ["fp16", "tq3"], [200, 300], [0, 100], max_tokens=4)
    assert set(grid) == {"fp16", "tq3"}
    assert all(a == 0.0 for cells in grid.values() for a in cells.values())
    # Grading: an answer holding the digits counts, one without does not.
    prompts = {}

    def answer_half(model, tokenizer, prompt, **kw):
        key = prompts.setdefault(len(prompts), tokenizer.decode(prompt).split("passkey is ")[1][:5])
        return f"It is {key}." if len(prompts) % 2 else "I do not know."

    monkeypatch.setattr(niah, "generate", answer_half)
    grid = niah.run_grid(model, tokenizer, ["fp16"], [200], [0, 50], trials=2)
    assert grid["fp16"] == {(200, 0): 0.5, (200, 50): 0.5}
    table = niah.markdown(grid, [200], [0, 50])
    assert "| fp16 | 50% | 50% |" in table and "| 50% | 50% |" in table
