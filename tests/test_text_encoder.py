"""The frozen text encoder: which hidden state conditions the model, and a clear error for a layer it lacks."""

import pytest
import torch

from kiln.config import load_config
from kiln.text_encoder import build_text_encoder


def test_token_embedding_layer_is_context_free_and_last_layer_is_not():
    captions = ["a red circle", "a red square"]  # "red" is token 2 in both (after [CLS] and "a")
    first = build_text_encoder(load_config("smoke", ["text_encoder.hidden_layer=0"]).text_encoder)
    last = build_text_encoder(load_config("smoke").text_encoder)
    emb0, mask0 = first(captions)
    emb_last, _ = last(captions)
    assert emb0.shape == emb_last.shape and mask0.all()
    torch.testing.assert_close(emb0[0, 2], emb0[1, 2])  # the same word at the same place: the same vector
    assert not torch.allclose(emb_last[0, 2], emb_last[1, 2], atol=1e-3)  # contextual: depends on the shape word
    assert not torch.allclose(emb0, emb_last)


def test_missing_layer_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"text_encoder.hidden_layer: 7 is outside") as err:
        build_text_encoder(load_config("smoke", ["text_encoder.hidden_layer=7"]).text_encoder)
    assert "\n" not in str(err.value)
